#include "vdit/io/init_video.h"

#include "vdit/common.h"
#include "vdit/io/image_io.h"
#include "vdit/io/input_file.h"
#include "vdit/io/video_io.h"

#include <ATen/ops/_upsample_bilinear2d_aa.h>

#include <algorithm>
#include <cctype>
#include <filesystem>

namespace vdit {

namespace {

namespace fs = std::filesystem;

bool is_image_path(const std::string& path) {
  std::string ext = fs::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".png" || ext == ".jpg" || ext == ".jpeg" || ext == ".bmp" || ext == ".tga";
}

std::string size_text(std::int64_t width, std::int64_t height) {
  return std::to_string(width) + "x" + std::to_string(height);
}

}  // namespace

at::Tensor fit_init_frames(const at::Tensor& frames_in, std::int64_t count, std::int64_t height, std::int64_t width,
                           const std::string& name) {
  if (count < 1 || height < 1 || width < 1) throw InputError(name + ": the run needs at least one frame of one pixel");
  at::Tensor frames = frames_in;
  if (frames.defined() && frames.dim() == 3) frames = frames.unsqueeze(1);  // an image: one frame
  if (!frames.defined() || frames.dim() != 4 || frames.size(0) != 3 || frames.size(1) < 1 || frames.size(2) < 1 ||
      frames.size(3) < 1)
    throw InputError(name + ": expected RGB frames [3, F, H, W], got " +
                     (frames.defined() ? c10::str(frames.sizes()) : std::string("nothing")));
  const std::int64_t available = frames.size(1);
  if (available > 1 && available < count)
    throw InputError(name + " has " + std::to_string(available) + " frames but the run needs " + std::to_string(count) +
                     " (give a longer clip, fewer --frames, or a single image to repeat)");
  frames = frames.narrow(1, 0, std::min(available, count)).to(at::kFloat);
  if (frames.size(2) != height || frames.size(3) != width) {
    // [3, F, H, W] -> [F, 3, H, W] for the 2-D resize, and back.
    at::Tensor planes = frames.permute({1, 0, 2, 3}).contiguous();
    planes = at::_upsample_bilinear2d_aa(planes, {height, width}, /*align_corners=*/false);
    frames = planes.permute({1, 0, 2, 3}).clamp(-1.0, 1.0);
  }
  if (frames.size(1) == 1 && count > 1) frames = frames.expand({3, count, height, width});
  return frames.contiguous();
}

at::Tensor read_init_frames(const std::string& path, std::int64_t count, std::int64_t height, std::int64_t width) {
  check_input_path(path, "--init", InputKind::FileOrDirectory);
  std::error_code ec;
  at::Tensor frames;
  if (!fs::is_directory(path, ec) && is_image_path(path)) {
    frames = read_image(path);
  } else {
    frames = read_video(path, count).frames;
  }
  const at::Tensor fitted = fit_init_frames(frames, count, height, width, "--init '" + path + "'");
  if (frames.size(-2) != height || frames.size(-1) != width) {
    const double given = static_cast<double>(frames.size(-1)) / static_cast<double>(frames.size(-2));
    const double wanted = static_cast<double>(width) / static_cast<double>(height);
    log_verbose("--init: resized " + size_text(frames.size(-1), frames.size(-2)) + " to " + size_text(width, height));
    if (std::abs(given / wanted - 1.0) > 0.01)
      log_warning("--init '" + path + "' is " + size_text(frames.size(-1), frames.size(-2)) + ", stretched to " +
                  size_text(width, height) + " (another aspect ratio)");
  }
  return fitted;
}

}  // namespace vdit
