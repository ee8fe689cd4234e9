// Format dispatch, PNG frame directories and contact sheets: everything about video output that
// does not need FFmpeg (the FFmpeg encoders/decoders live in video_ffmpeg.cpp).
#include "vdit/io/video_io.h"

#include "vdit/common.h"
#include "vdit/io/input_file.h"
#include "vdit/io/output_file.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>

namespace fs = std::filesystem;

namespace vdit {
namespace {

const std::vector<std::string>& container_formats() {
  static const std::vector<std::string> formats{"mp4", "mov", "mkv", "webm", "webp", "gif"};
  return formats;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// "frame_00042.png" -> 42; anything else -> -1.
int64_t frame_index_of(const std::string& name) {
  constexpr const char* kPrefix = "frame_";
  constexpr const char* kSuffix = ".png";
  if (name.size() <= 10 || name.compare(0, 6, kPrefix) != 0 || name.compare(name.size() - 4, 4, kSuffix) != 0)
    return -1;
  const std::string digits = name.substr(6, name.size() - 10);
  if (digits.empty() || digits.size() > 12 ||
      !std::all_of(digits.begin(), digits.end(), [](unsigned char c) { return std::isdigit(c); }))
    return -1;
  return std::stoll(digits);
}

void check_frames_tensor(const at::Tensor& frames, const std::string& path) {
  if (!frames.defined() || frames.dim() != 4 || (frames.size(0) != 3 && frames.size(0) != 1) ||
      frames.size(1) < 1 || frames.size(2) < 1 || frames.size(3) < 1)
    throw InputError("cannot write '" + path + "': expected frames [3,F,H,W], got " +
                     (frames.defined() ? c10::str(frames.sizes()) : std::string("an undefined tensor")));
}

std::string format_fps(double fps) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.6g", fps);
  return buffer;
}

void write_png_frames(const std::string& path, const at::Tensor& rgb8, const VideoWriteOptions& options) {
  TextChunks text;
  if (auto it = options.metadata.find("parameters"); it != options.metadata.end())
    text.emplace_back("parameters", it->second);
  else if (!options.metadata.empty())
    text.emplace_back("parameters", metadata_comment(options.metadata));
  text.emplace_back("fps", format_fps(options.fps));

  AtomicOutput::Options output_options;
  output_options.overwrite = options.overwrite;
  output_options.kind = AtomicOutput::Kind::Directory;
  output_options.replaceable_entry = [](const std::string& name) { return frame_index_of(name) >= 0; };
  AtomicOutput out(path, output_options);
  for (int64_t f = 0; f < rgb8.size(0); ++f) {
    const std::vector<unsigned char> png = encode_png(rgb8[f], text);
    out.write_file(frame_file_name(f + 1), png.data(), png.size());
  }
  out.commit();
}

std::vector<fs::path> frame_files(const std::string& dir) {
  std::vector<std::pair<int64_t, fs::path>> indexed;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const int64_t index = frame_index_of(it->path().filename().string());
    if (index >= 0) indexed.emplace_back(index, it->path());
  }
  if (ec) throw InputError("cannot list frame directory '" + dir + "': " + ec.message());
  if (indexed.empty()) throw InputError("no frame_*.png files in directory '" + dir + "'");
  std::sort(indexed.begin(), indexed.end());
  std::vector<fs::path> files;
  for (auto& entry : indexed) files.push_back(std::move(entry.second));
  return files;
}

VideoData read_png_frames(const std::string& dir, int64_t max_frames) {
  std::vector<fs::path> files = frame_files(dir);
  if (max_frames > 0 && static_cast<int64_t>(files.size()) > max_frames) files.resize(static_cast<std::size_t>(max_frames));
  std::vector<at::Tensor> frames;
  for (const fs::path& file : files) {
    at::Tensor frame = read_image(file.string());
    if (!frames.empty() && frame.sizes() != frames.front().sizes())
      throw InputError("frame '" + file.string() + "' has size " + c10::str(frame.sizes()) + ", the first frame " +
                       c10::str(frames.front().sizes()));
    frames.push_back(std::move(frame));
  }
  VideoData video;
  video.frames = at::stack(frames, 1);
  video.fps = 16;
  for (const auto& [key, value] : read_png_text(files.front().string())) {
    if (key != "fps") continue;
    try {
      const double fps = std::stod(value);
      if (std::isfinite(fps) && fps > 0) video.fps = fps;
    } catch (const std::exception&) {
    }
  }
  return video;
}

}  // namespace

std::string frame_file_name(int64_t index) {
  char name[32];
  std::snprintf(name, sizeof(name), "frame_%05lld.png", static_cast<long long>(index));
  return name;
}

std::string metadata_comment(const std::map<std::string, std::string>& metadata) {
  nlohmann::json object = nlohmann::json::object();
  for (const auto& [key, value] : metadata) object[key] = value;
  // Invalid UTF-8 in a prompt must not abort the write: replace it.
  return object.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string resolve_video_format(const std::string& path, const std::string& format) {
  std::string name = lower(format);
  if (name.empty()) {
    if (!path.empty() && path.back() == '/') return "png";
    std::string ext = lower(fs::path(path).extension().string());
    if (!ext.empty()) ext.erase(0, 1);
    name = ext == "m4v" ? "mp4" : ext;
    if (name.empty())
      throw InputError("cannot tell the video format of '" + path +
                       "' (no extension); add one or pass --format mp4|webm|webp|gif|png");
  }
  if (name == "m4v") name = "mp4";
  if (name == "frames") name = "png";
  if (name == "png" || std::find(container_formats().begin(), container_formats().end(), name) !=
                           container_formats().end())
    return name;
  throw InputError((format.empty() ? "unknown video extension '." : "unknown video format '") + name + "' for '" +
                   path + "' (mp4, mov, mkv, webm, webp, gif, png)");
}

std::string video_encoder_for(const std::string& format) {
  const std::string name = lower(format);
  if (name == "png") return "png";
#if defined(VDIT_WITH_FFMPEG)
  return detail::ffmpeg_encoder_for(name);
#else
  return "";
#endif
}

std::vector<std::string> available_video_formats() {
  std::vector<std::string> formats;
  for (const std::string& format : container_formats())
    if (!video_encoder_for(format).empty()) formats.push_back(format);
  formats.push_back("png");
  return formats;
}

void check_video_output(const std::string& path, const VideoWriteOptions& options) {
  const std::string format = resolve_video_format(path, options.format);
  if (!std::isfinite(options.fps) || options.fps <= 0 || options.fps > 1000)
    throw InputError("fps must be in (0, 1000], got " + format_fps(options.fps));
  if (options.crf < 0 || options.crf > 63)
    throw InputError("crf must be in 0..63, got " + std::to_string(options.crf));
  if (format == "png") {
    // An existing directory is only replaced when it holds nothing but frame files.
    check_output_path(path, options.overwrite, /*directory=*/true,
                      [](const std::string& name) { return frame_index_of(name) >= 0; });
    return;
  }
#if defined(VDIT_WITH_FFMPEG)
  if (video_encoder_for(format).empty())
    throw InputError("cannot write '" + path + "': this FFmpeg has no encoder for " + format + " (available: " +
                     [] {
                       std::string list;
                       for (const std::string& f : available_video_formats()) list += (list.empty() ? "" : ", ") + f;
                       return list;
                     }() +
                     ")");
  check_output_path(path, options.overwrite, /*directory=*/false);
#else
  throw InputError("cannot write '" + path + "' as " + format +
                   ": this vdit was built without FFmpeg (VDIT_WITH_FFMPEG=OFF); use --format png");
#endif
}

void write_video(const std::string& path, const at::Tensor& frames, const VideoWriteOptions& options) {
  check_frames_tensor(frames, path);
  check_video_output(path, options);
  const std::string format = resolve_video_format(path, options.format);
  const at::Tensor rgb8 = to_rgb8(frames);  // [F,H,W,3] uint8 CPU
  if (format == "png") {
    write_png_frames(path, rgb8, options);
    return;
  }
#if defined(VDIT_WITH_FFMPEG)
  detail::ffmpeg_write_video(path, format, rgb8, options);
#endif
}

VideoData read_video(const std::string& path, int64_t max_frames) {
  check_input_path(path, "cannot read video", InputKind::FileOrDirectory);
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (fs::is_directory(status)) return read_png_frames(path, max_frames);
#if defined(VDIT_WITH_FFMPEG)
  return detail::ffmpeg_read_video(path, max_frames);
#else
  throw InputError("cannot read video '" + path +
                   "': this vdit was built without FFmpeg (VDIT_WITH_FFMPEG=OFF); only PNG frame directories");
#endif
}

std::map<std::string, std::string> read_video_metadata(const std::string& path) {
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (!fs::exists(status)) throw InputError("cannot read video '" + path + "': no such file or directory");
  if (fs::is_directory(status)) {
    std::map<std::string, std::string> metadata;
    for (auto& [key, value] : read_png_text(frame_files(path).front().string())) metadata[key] = value;
    return metadata;
  }
#if defined(VDIT_WITH_FFMPEG)
  return detail::ffmpeg_read_metadata(path);
#else
  throw InputError("cannot read metadata of '" + path + "': this vdit was built without FFmpeg");
#endif
}

void check_contact_sheet_output(const std::string& path, bool overwrite) {
  const std::string ext = lower(fs::path(path).extension().string());
  if (ext != ".png" && ext != ".jpg" && ext != ".jpeg")
    throw InputError("contact sheet '" + path + "' must be a .png or .jpg file");
  check_output_path(path, overwrite);
}

void write_contact_sheet(const std::string& path, const at::Tensor& frames, int columns, const TextChunks& text,
                         bool overwrite, int gap) {
  check_frames_tensor(frames, path);
  const std::string ext = lower(fs::path(path).extension().string());
  if (gap < 0) throw InputError("contact sheet gap must be >= 0");
  check_contact_sheet_output(path, overwrite);

  const at::Tensor rgb8 = to_rgb8(frames);  // [F,H,W,3]
  const int64_t count = rgb8.size(0), height = rgb8.size(1), width = rgb8.size(2);
  const int64_t cols = columns > 0 ? std::min<int64_t>(columns, count)
                                   : static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(count))));
  const int64_t rows = (count + cols - 1) / cols;
  const int64_t sheet_h = rows * height + (rows - 1) * gap, sheet_w = cols * width + (cols - 1) * gap;
  if (sheet_h > 65535 || sheet_w > 65535)
    throw InputError("contact sheet would be " + std::to_string(sheet_w) + "x" + std::to_string(sheet_h) +
                     " pixels; use more/fewer columns or fewer frames");
  at::Tensor sheet = at::zeros({sheet_h, sheet_w, 3}, rgb8.options());
  for (int64_t f = 0; f < count; ++f) {
    const int64_t top = (f / cols) * (height + gap), left = (f % cols) * (width + gap);
    sheet.narrow(0, top, height).narrow(1, left, width).copy_(rgb8[f]);
  }
  const std::vector<unsigned char> bytes = ext == ".png" ? encode_png(sheet, text) : encode_jpeg(sheet, 95, text);
  AtomicOutput out(path, overwrite);
  out.write(bytes);
  out.commit();
}

}  // namespace vdit
