// The input of an image-to-video / video-to-video (SDEdit) run: an image, a video or a PNG frame
// directory turned into exactly the frames a run of a given size needs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace vdit {

// `frames` [3, F, H, W] (or one image [3, H, W]) in [-1, 1] -> [3, count, height, width] f32 in
// [-1, 1]: the first `count` frames, each resized bilinearly (antialiased when shrinking, so a
// large photo does not alias) when its size differs from height x width. A single frame (an
// image) is repeated over the `count` frames; a clip with more than one frame but fewer than
// `count` is refused (InputError naming `name`), as is anything that is not [3, F, H, W].
at::Tensor fit_init_frames(const at::Tensor& frames, std::int64_t count, std::int64_t height, std::int64_t width,
                           const std::string& name = "the init video");

// Reads `path` - an image (.png .jpg .jpeg .bmp .tga), a video file FFmpeg reads (.mp4 .webm .gif
// ...) or a directory of frame_*.png - decoding at most `count` frames, and fits it as above.
// InputError naming the file for anything unreadable.
at::Tensor read_init_frames(const std::string& path, std::int64_t count, std::int64_t height, std::int64_t width);

}  // namespace vdit
