// generate_clip: text-to-video through vdit's public API, as a program outside vdit uses it
// (examples/CMakeLists.txt builds it against an installed vdit with find_package(vdit)).
//
//   generate_clip MODEL OUT [--prompt TEXT] [--steps N] [--size WxH] [--frames N] [--guidance G] [--seed S]
//
// MODEL: a Wan2.1 model, as a diffusers directory, an original Wan2.1 checkpoint directory or
// single files (vdit's built-in demo model is models/shapes). OUT: .mp4, .webm, .gif, ... or a
// path ending in '/' for a directory of PNG frames. The defaults suit the demo model; a Wan2.1
// 1.3B model wants e.g. --size 832x480 --frames 81 --steps 50 --guidance 5.
#include <vdit/common.h>
#include <vdit/io/video_io.h>
#include <vdit/models/wan_checkpoint.h>
#include <vdit/pipelines/wan_t2v.h>

#include <cstdio>
#include <exception>
#include <string>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL OUT [--prompt TEXT] [--steps N] [--size WxH] [--frames N] "
                         "[--guidance G] [--seed S]\n", argv[0]);
    return 2;
  }
  try {
    vdit::T2VSettings settings;  // what `vdit generate` also fills in from its command line
    settings.prompt = "a red circle moving right";
    settings.width = settings.height = 64;
    settings.frames = 9;
    settings.steps = 30;
    settings.guidance = 2.5;
    for (int i = 3; i + 1 < argc; i += 2) {
      const std::string key = argv[i], value = argv[i + 1];
      if (key == "--prompt") settings.prompt = value;
      else if (key == "--steps") settings.steps = std::stoi(value);
      else if (key == "--frames") settings.frames = std::stoll(value);
      else if (key == "--guidance") settings.guidance = std::stod(value);
      else if (key == "--seed") settings.seed = std::stoull(value);
      else if (key == "--size" && value.find('x') != std::string::npos) {
        settings.width = std::stoll(value.substr(0, value.find('x')));
        settings.height = std::stoll(value.substr(value.find('x') + 1));
      } else throw vdit::InputError("unknown option or value: " + key + " " + value);
    }
    if (argc % 2 == 0) throw vdit::InputError(std::string("option ") + argv[argc - 1] + " has no value");

    vdit::set_threads(0);  // all cores
    // Finds the DiT, VAE, text encoder and tokenizer in any layout vdit reads.
    vdit::WanT2VPipeline pipeline(vdit::locate_wan_model(argv[1]), vdit::WanT2VOptions{});  // CPU, f32
    pipeline.validate(settings);  // sizes and frame count the model takes, before any weights load
    const vdit::T2VResult result = pipeline.generate(settings, [](int done, int total) {
      std::fprintf(stderr, "\rstep %d/%d", done, total);
      if (done == total) std::fprintf(stderr, "\n");
    });

    vdit::VideoWriteOptions video;
    video.fps = 8;
    video.metadata = result.metadata;  // the settings, stored with the clip
    video.overwrite = true;
    vdit::write_video(argv[2], result.video, video);
    std::printf("%s: %lldx%lld, %lld frames (denoise %.1f s, decode %.1f s)\n", argv[2],
                static_cast<long long>(settings.width), static_cast<long long>(settings.height),
                static_cast<long long>(settings.frames), result.times.denoise, result.times.decode);
    return 0;
  } catch (const vdit::InputError& e) {
    std::fprintf(stderr, "generate_clip: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "generate_clip: %s\n", e.what());
    return 1;
  }
}
