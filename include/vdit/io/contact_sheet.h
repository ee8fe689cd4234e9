// Contact sheets for judging clips by eye: every frame of a clip in one PNG grid, so a page of
// results from `vdit eval shapes --save-dir` can be scanned without a video player.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <string>

namespace vdit {

// Writes `video` ([3,F,H,W] in [-1,1], any dtype/device) as one image at `path` (.png; .jpg also
// works): frames left to right, top to bottom, `columns` per row (0: ceil(sqrt(F)), near-square),
// separated by 2-pixel black lines. `metadata` goes into the PNG's "parameters" text chunk: its
// "parameters" entry when there is one, else all entries as one JSON object (the convention of
// write_video's PNG frames). Like every vdit output it is written atomically and an existing
// file is only replaced with `overwrite` (else InputError, before anything is encoded).
void write_contact_sheet(const at::Tensor& video, const std::string& path,
                         const std::map<std::string, std::string>& metadata = {}, int columns = 0,
                         bool overwrite = false);

}  // namespace vdit
