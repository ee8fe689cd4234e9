// Video output/input: MP4 (H.264), WebM (VP9), animated WebP, GIF via FFmpeg, and numbered PNG
// frames (works without FFmpeg). A video is an at::Tensor [3,F,H,W] float in [-1,1].
#pragma once

#include "vdit/io/image_io.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace vdit {

struct VideoWriteOptions {
  double fps = 16;
  // Constant-quality setting, x264 scale (0 = lossless where the codec allows, 18 = visually
  // lossless, 23 = x264 default, 51 = worst). VP9 uses it as its own crf (0..63); WebP maps it to
  // quality 100 - crf/2 (crf 0 = lossless WebP); GIF ignores it.
  int crf = 18;
  // "" = from the extension. One of: mp4 (also .m4v), mov, mkv, webm, webp, gif, png (a
  // directory of frame_00001.png ...; also chosen for a path ending in '/').
  std::string format;
  // Generation settings. Containers get all entries as one JSON object in "comment" (unless a
  // "comment" entry is given) plus one tag per entry where the muxer keeps custom tags (MP4/MOV
  // via use_metadata_tags, MKV/WebM). GIF/WebP carry none. PNG frames get a tEXt "parameters"
  // chunk: the "parameters" entry if present, else the JSON, and a tEXt "fps".
  std::map<std::string, std::string> metadata;
  bool overwrite = false;
};

struct VideoData {
  at::Tensor frames;  // [3,F,H,W] float in [-1,1], CPU
  double fps = 0;
};

// Canonical format name for a path and a requested format ("" = from extension).
// Unknown -> InputError.
std::string resolve_video_format(const std::string& path, const std::string& format = "");

// Validates everything write_video would reject (format, encoder available, fps/crf ranges,
// output path/overwrite) without encoding anything: call it before generating.
void check_video_output(const std::string& path, const VideoWriteOptions& options = {});

// Writes [3,F,H,W] (F >= 1; any dtype/device) through AtomicOutput. H.264/MPEG-4 need even
// sizes: odd ones are padded by repeating the last row/column (with a warning).
void write_video(const std::string& path, const at::Tensor& frames, const VideoWriteOptions& options = {});

// Reads every frame of any FFmpeg-readable video, or a directory of frame_*.png written by
// write_video. `max_frames` > 0 stops early. Missing/corrupt -> InputError naming the file.
VideoData read_video(const std::string& path, int64_t max_frames = -1);

// Container-level metadata tags (keys as the demuxer reports them; MKV/WebM upper-case them),
// or for a frame directory the text chunks of its first frame.
std::map<std::string, std::string> read_video_metadata(const std::string& path);

// Validates everything write_contact_sheet would reject about its path (extension .png/.jpg/.jpeg,
// output path/overwrite) before any work.
void check_contact_sheet_output(const std::string& path, bool overwrite = false);

// One PNG (or JPEG, by extension) grid of the frames of [3,F,H,W], `columns` per row
// (<= 0: ceil(sqrt(F))), `gap` black pixels between cells.
void write_contact_sheet(const std::string& path, const at::Tensor& frames, int columns = 0,
                         const TextChunks& text = {}, bool overwrite = false, int gap = 2);

// The single JSON string stored in a container's "comment".
std::string metadata_comment(const std::map<std::string, std::string>& metadata);

// Formats this build can write right now ("png" always; the others when FFmpeg has an encoder).
std::vector<std::string> available_video_formats();

// The encoder write_video would try first for a format ("png" for png; "" when none).
std::string video_encoder_for(const std::string& format);

// Name of frame `index` (1-based) in a PNG frame directory: frame_00001.png.
std::string frame_file_name(int64_t index);

namespace detail {
#if defined(VDIT_WITH_FFMPEG)
// Implemented in video_ffmpeg.cpp. `rgb8` is [F,H,W,3] uint8, CPU, contiguous; `format` is
// already resolved and checked.
void ffmpeg_write_video(const std::string& path, const std::string& format, const at::Tensor& rgb8,
                        const VideoWriteOptions& options);
VideoData ffmpeg_read_video(const std::string& path, int64_t max_frames);
std::map<std::string, std::string> ffmpeg_read_metadata(const std::string& path);
std::string ffmpeg_encoder_for(const std::string& format);
#endif
}  // namespace detail

}  // namespace vdit
