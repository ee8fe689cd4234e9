// Still images: PNG/JPEG/BMP/TGA in, PNG/JPEG out, PNG text chunks for generation settings.
//
// Convention used throughout vdit: an image is an at::Tensor [3,H,W] (RGB, channel first),
// float, values in [-1,1]; a pixel byte u maps to u/127.5 - 1. Writing rounds back to bytes, so
// write -> read is exact for images that came from 8-bit data.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace vdit {

// Ordered (keyword, text) pairs, e.g. {{"parameters", "a cat, Steps: 30, Seed: 1, ..."}}.
using TextChunks = std::vector<std::pair<std::string, std::string>>;

// Reads PNG (8/16-bit, gray/RGB/alpha; alpha is dropped), JPEG, BMP, TGA into [3,H,W] float in
// [-1,1] on the CPU. Missing, unreadable or corrupt file -> InputError naming the file.
at::Tensor read_image(const std::string& path);

struct ImageWriteOptions {
  std::string format;     // "" = from the extension: "png", "jpg"/"jpeg"
  int jpeg_quality = 95;  // 1..100
  // PNG: one text chunk each, inserted after IHDR: tEXt when the text is ASCII, iTXt (UTF-8)
  // otherwise. JPEG: one COM segment each, "keyword: text".
  TextChunks text;
  bool overwrite = false;
};

// Writes [3,H,W] (or [1,H,W] gray) in [-1,1], any dtype/device, through AtomicOutput.
void write_image(const std::string& path, const at::Tensor& image,
                 const ImageWriteOptions& options = {});

// Text chunks (tEXt, zTXt, iTXt) of a PNG file in file order. Not a PNG / bad chunk CRC /
// truncated -> InputError naming the file.
TextChunks read_png_text(const std::string& path);

// PNG: read_png_text. JPEG: each COM segment, split into (keyword, text) at the first ": " when
// that prefix is a single word, else ("comment", payload). Other formats: empty.
TextChunks read_image_text(const std::string& path);

// ---- lower level (shared with the video code) ----------------------------------------------

// [3, ...] channel-first in [-1,1] -> [..., 3] uint8 channel-last, CPU, contiguous.
// Accepts [1, ...] (gray, repeated to RGB). NaN becomes mid-gray.
at::Tensor to_rgb8(const at::Tensor& channel_first);
// [..., 3] uint8 channel-last -> [3, ...] float in [-1,1] (same device).
at::Tensor from_rgb8(const at::Tensor& channel_last);

// Encodes an RGB8 [H,W,3] tensor.
std::vector<unsigned char> encode_png(const at::Tensor& rgb8, const TextChunks& text = {});
std::vector<unsigned char> encode_jpeg(const at::Tensor& rgb8, int quality = 95,
                                       const TextChunks& text = {});
// Decodes an in-memory image; `name` is used in error messages.
at::Tensor decode_image(const unsigned char* data, std::size_t size, const std::string& name);

// CRC-32 as used by PNG chunks (over chunk type + data).
std::uint32_t png_crc32(const unsigned char* data, std::size_t size, std::uint32_t crc = 0);

}  // namespace vdit
