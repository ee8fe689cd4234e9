// Image decoding/encoding with stb, plus our own PNG text-chunk writer and reader.
#include "vdit/io/image_io.h"

#include "vdit/common.h"
#include "vdit/io/input_file.h"
#include "vdit/io/output_file.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>

#define STBI_FAILURE_USERMSG
#define STB_IMAGE_IMPLEMENTATION
#include "stb_image.h"
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include "stb_image_write.h"

namespace vdit {
namespace {

constexpr unsigned char kPngSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

std::vector<unsigned char> read_file_bytes(const std::string& path, const char* what) {
  check_input_path(path, std::string("cannot read ") + what);
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) throw InputError(std::string("cannot read ") + what + " '" + path + "': " + std::strerror(errno));
  std::vector<unsigned char> bytes;
  unsigned char buffer[1 << 16];
  std::size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), f.get())) > 0) bytes.insert(bytes.end(), buffer, buffer + n);
  if (std::ferror(f.get())) throw InputError(std::string("cannot read ") + what + " '" + path + "': read error");
  return bytes;
}

std::uint32_t read_be32(const unsigned char* p) {
  return (std::uint32_t(p[0]) << 24) | (std::uint32_t(p[1]) << 16) | (std::uint32_t(p[2]) << 8) | p[3];
}

void append_be32(std::vector<unsigned char>& out, std::uint32_t v) {
  out.push_back(static_cast<unsigned char>(v >> 24));
  out.push_back(static_cast<unsigned char>(v >> 16));
  out.push_back(static_cast<unsigned char>(v >> 8));
  out.push_back(static_cast<unsigned char>(v));
}

std::string lower_extension(const std::string& path) {
  std::string ext = std::filesystem::path(path).extension().string();
  if (!ext.empty() && ext[0] == '.') ext.erase(0, 1);
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext;
}

// PNG keywords: 1-79 printable Latin-1 characters, no leading/trailing/double spaces.
void check_png_keyword(const std::string& keyword) {
  bool ok = !keyword.empty() && keyword.size() <= 79 && keyword.front() != ' ' && keyword.back() != ' ' &&
            keyword.find("  ") == std::string::npos;
  for (unsigned char c : keyword) ok = ok && ((c >= 32 && c <= 126) || c >= 161);
  if (!ok) throw InputError("invalid PNG text keyword '" + keyword + "' (1-79 printable characters)");
}

bool is_ascii(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](unsigned char c) { return c < 0x80; });
}

// One complete chunk: length, type, data, CRC over type + data.
void append_chunk(std::vector<unsigned char>& out, const char type[4], const std::vector<unsigned char>& data) {
  append_be32(out, static_cast<std::uint32_t>(data.size()));
  const std::size_t type_at = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  append_be32(out, png_crc32(out.data() + type_at, 4 + data.size()));
}

std::vector<unsigned char> text_chunks_bytes(const TextChunks& text) {
  std::vector<unsigned char> out;
  for (const auto& [keyword, value] : text) {
    check_png_keyword(keyword);
    if (value.find('\0') != std::string::npos)
      throw InputError("PNG text for keyword '" + keyword + "' contains a NUL byte");
    std::vector<unsigned char> data(keyword.begin(), keyword.end());
    data.push_back(0);
    if (is_ascii(value)) {
      data.insert(data.end(), value.begin(), value.end());
      append_chunk(out, "tEXt", data);
    } else {
      // tEXt is Latin-1; UTF-8 text (non-English prompts) belongs in an uncompressed iTXt.
      data.push_back(0);  // compression flag
      data.push_back(0);  // compression method
      data.push_back(0);  // empty language tag
      data.push_back(0);  // empty translated keyword
      data.insert(data.end(), value.begin(), value.end());
      append_chunk(out, "iTXt", data);
    }
  }
  return out;
}

// zlib stream -> text, bounded so a hostile chunk cannot exhaust memory.
std::string inflate_text(const unsigned char* data, std::size_t size, const std::string& path) {
  for (int capacity = 1 << 16; capacity <= (1 << 26); capacity <<= 4) {
    std::string out(static_cast<std::size_t>(capacity), '\0');
    const int n = stbi_zlib_decode_buffer(out.data(), capacity, reinterpret_cast<const char*>(data),
                                          static_cast<int>(size));
    if (n >= 0) {
      out.resize(static_cast<std::size_t>(n));
      return out;
    }
  }
  throw InputError("corrupt or oversized compressed text chunk in PNG '" + path + "'");
}

void stbi_write_to_vector(void* context, void* data, int size) {
  auto* out = static_cast<std::vector<unsigned char>*>(context);
  const auto* bytes = static_cast<const unsigned char*>(data);
  out->insert(out->end(), bytes, bytes + size);
}

void check_rgb8(const at::Tensor& rgb8) {
  if (rgb8.dim() != 3 || rgb8.size(2) != 3 || rgb8.scalar_type() != at::kByte || rgb8.size(0) < 1 ||
      rgb8.size(1) < 1)
    throw InputError("image encoder expects an RGB8 tensor [H,W,3] uint8, got " + std::string(rgb8.toString()) +
                     " " + c10::str(rgb8.sizes()));
  if (rgb8.size(0) > (1 << 24) || rgb8.size(1) > (1 << 24))
    throw InputError("image too large to encode: " + c10::str(rgb8.sizes()));
}

}  // namespace

// ---------------------------------------------------------------------------------------------

std::uint32_t png_crc32(const unsigned char* data, std::size_t size, std::uint32_t crc) {
  static const std::array<std::uint32_t, 256> table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t n = 0; n < 256; ++n) {
      std::uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (std::size_t i = 0; i < size; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

at::Tensor to_rgb8(const at::Tensor& channel_first) {
  if (channel_first.dim() < 2 || (channel_first.size(0) != 3 && channel_first.size(0) != 1))
    throw InputError("expected an image tensor [3,...] (channel first), got " + c10::str(channel_first.sizes()));
  at::Tensor x = channel_first.detach().to(at::kFloat);
  if (x.size(0) == 1) {
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes[0] = 3;
    x = x.expand(sizes).contiguous();
  }
  x = at::nan_to_num(x, 0.0, 1.0, -1.0);
  x = x.add(1.0).mul(127.5).round().clamp(0, 255).to(at::kByte);
  std::vector<int64_t> order;
  for (int64_t d = 1; d < x.dim(); ++d) order.push_back(d);
  order.push_back(0);
  return x.permute(order).contiguous().to(at::kCPU);
}

at::Tensor from_rgb8(const at::Tensor& channel_last) {
  if (channel_last.dim() < 2 || channel_last.size(-1) != 3)
    throw InputError("expected an RGB8 tensor [...,3], got " + c10::str(channel_last.sizes()));
  const int64_t n = channel_last.dim();
  std::vector<int64_t> order{n - 1};
  for (int64_t d = 0; d < n - 1; ++d) order.push_back(d);
  return channel_last.permute(order).to(at::kFloat).div(127.5).sub(1.0).contiguous();
}

std::vector<unsigned char> encode_png(const at::Tensor& rgb8_in, const TextChunks& text) {
  check_rgb8(rgb8_in);
  const at::Tensor rgb8 = rgb8_in.to(at::kCPU).contiguous();
  const int h = static_cast<int>(rgb8.size(0)), w = static_cast<int>(rgb8.size(1));
  std::vector<unsigned char> png;
  if (!stbi_write_png_to_func(stbi_write_to_vector, &png, w, h, 3, rgb8.data_ptr<uint8_t>(), w * 3))
    throw RuntimeError("PNG encoding failed");
  if (text.empty()) return png;
  // The signature (8 bytes) is followed by IHDR: 4 length + 4 type + 13 data + 4 CRC.
  constexpr std::size_t kAfterIhdr = 8 + 4 + 4 + 13 + 4;
  if (png.size() < kAfterIhdr || std::memcmp(png.data() + 12, "IHDR", 4) != 0)
    throw RuntimeError("PNG encoder produced an unexpected layout");
  const std::vector<unsigned char> chunks = text_chunks_bytes(text);
  png.insert(png.begin() + kAfterIhdr, chunks.begin(), chunks.end());
  return png;
}

std::vector<unsigned char> encode_jpeg(const at::Tensor& rgb8_in, int quality, const TextChunks& text) {
  check_rgb8(rgb8_in);
  if (quality < 1 || quality > 100) throw InputError("JPEG quality must be 1..100, got " + std::to_string(quality));
  const at::Tensor rgb8 = rgb8_in.to(at::kCPU).contiguous();
  const int h = static_cast<int>(rgb8.size(0)), w = static_cast<int>(rgb8.size(1));
  if (w > 65535 || h > 65535) throw InputError("JPEG images are limited to 65535x65535");
  std::vector<unsigned char> jpg;
  if (!stbi_write_jpg_to_func(stbi_write_to_vector, &jpg, w, h, 3, rgb8.data_ptr<uint8_t>(), quality))
    throw RuntimeError("JPEG encoding failed");
  if (text.empty()) return jpg;
  // COM segments go after SOI and the JFIF APP0 segment (JFIF wants APP0 first).
  std::size_t insert_at = 2;
  if (jpg.size() > 6 && jpg[2] == 0xFF && jpg[3] == 0xE0) insert_at = 4 + ((std::size_t(jpg[4]) << 8) | jpg[5]);
  std::vector<unsigned char> segments;
  for (const auto& [keyword, value] : text) {
    std::string payload = keyword + ": " + value;
    constexpr std::size_t kMaxPayload = 65533;
    if (payload.size() > kMaxPayload) {
      log_warning("JPEG comment '" + keyword + "' truncated to 64 KiB");
      payload.resize(kMaxPayload);
    }
    const std::size_t length = payload.size() + 2;
    segments.insert(segments.end(), {0xFF, 0xFE, static_cast<unsigned char>(length >> 8),
                                     static_cast<unsigned char>(length & 0xFF)});
    segments.insert(segments.end(), payload.begin(), payload.end());
  }
  jpg.insert(jpg.begin() + static_cast<std::ptrdiff_t>(insert_at), segments.begin(), segments.end());
  return jpg;
}

at::Tensor decode_image(const unsigned char* data, std::size_t size, const std::string& name) {
  if (size == 0) throw InputError("cannot read image '" + name + "': file is empty");
  if (size > static_cast<std::size_t>(INT32_MAX)) throw InputError("cannot read image '" + name + "': file too large");
  const int len = static_cast<int>(size);
  int w = 0, h = 0, channels = 0;
  if (!stbi_info_from_memory(data, len, &w, &h, &channels))
    throw InputError("cannot read image '" + name + "': " + stbi_failure_reason());

  if (stbi_is_16_bit_from_memory(data, len)) {
    std::unique_ptr<stbi_us, void (*)(void*)> pixels(stbi_load_16_from_memory(data, len, &w, &h, &channels, 3),
                                                     &stbi_image_free);
    if (!pixels) throw InputError("cannot read image '" + name + "': " + stbi_failure_reason());
    // No uint16 dtype in this LibTorch: reinterpret as int16 and undo the sign.
    at::Tensor raw = at::from_blob(pixels.get(), {h, w, 3}, at::kShort).to(at::kInt).bitwise_and(0xFFFF);
    return raw.permute({2, 0, 1}).to(at::kFloat).div(65535.0 / 2.0).sub(1.0).contiguous();
  }
  std::unique_ptr<stbi_uc, void (*)(void*)> pixels(stbi_load_from_memory(data, len, &w, &h, &channels, 3),
                                                   &stbi_image_free);
  if (!pixels) throw InputError("cannot read image '" + name + "': " + stbi_failure_reason());
  return from_rgb8(at::from_blob(pixels.get(), {h, w, 3}, at::kByte));
}

at::Tensor read_image(const std::string& path) {
  const std::vector<unsigned char> bytes = read_file_bytes(path, "image");
  return decode_image(bytes.data(), bytes.size(), path);
}

void write_image(const std::string& path, const at::Tensor& image, const ImageWriteOptions& options) {
  std::string format = options.format.empty() ? lower_extension(path) : options.format;
  std::transform(format.begin(), format.end(), format.begin(), [](unsigned char c) { return std::tolower(c); });
  if (format != "png" && format != "jpg" && format != "jpeg")
    throw InputError("cannot write image '" + path + "': unsupported format '" + format + "' (png, jpg)");
  if (image.dim() != 3)
    throw InputError("cannot write image '" + path + "': expected [3,H,W], got " + c10::str(image.sizes()));
  check_output_path(path, options.overwrite);
  const at::Tensor rgb8 = to_rgb8(image);
  const std::vector<unsigned char> bytes =
      format == "png" ? encode_png(rgb8, options.text) : encode_jpeg(rgb8, options.jpeg_quality, options.text);
  AtomicOutput out(path, options.overwrite);
  out.write(bytes);
  out.commit();
}

TextChunks read_png_text(const std::string& path) {
  const std::vector<unsigned char> bytes = read_file_bytes(path, "PNG");
  if (bytes.size() < 8 || std::memcmp(bytes.data(), kPngSignature, 8) != 0)
    throw InputError("'" + path + "' is not a PNG file");
  TextChunks text;
  std::size_t pos = 8;
  while (true) {
    if (bytes.size() - pos < 12) throw InputError("PNG '" + path + "' is truncated (no IEND chunk)");
    const std::uint32_t length = read_be32(&bytes[pos]);
    if (length > bytes.size() - pos - 12) throw InputError("PNG '" + path + "' is truncated or corrupt");
    const unsigned char* type = &bytes[pos + 4];
    const unsigned char* data = &bytes[pos + 8];
    const std::string type_name(reinterpret_cast<const char*>(type), 4);
    if (type_name == "IEND") break;
    if (type_name == "tEXt" || type_name == "zTXt" || type_name == "iTXt") {
      if (png_crc32(type, 4 + length) != read_be32(data + length))
        throw InputError("PNG '" + path + "': CRC mismatch in " + type_name + " chunk");
      const unsigned char* end = data + length;
      const unsigned char* nul = std::find(data, end, 0);
      if (nul == end) throw InputError("PNG '" + path + "': " + type_name + " chunk without keyword terminator");
      std::string keyword(reinterpret_cast<const char*>(data), nul - data);
      const unsigned char* rest = nul + 1;
      if (type_name == "tEXt") {
        text.emplace_back(std::move(keyword), std::string(reinterpret_cast<const char*>(rest), end - rest));
      } else if (type_name == "zTXt") {
        if (rest >= end) throw InputError("PNG '" + path + "': empty zTXt chunk");
        text.emplace_back(std::move(keyword), inflate_text(rest + 1, end - rest - 1, path));
      } else {
        // iTXt: compression flag, method, language\0, translated keyword\0, text.
        if (end - rest < 2) throw InputError("PNG '" + path + "': short iTXt chunk");
        const bool compressed = rest[0] != 0;
        const unsigned char* language_end = std::find(rest + 2, end, 0);
        const unsigned char* translated_end = language_end == end ? end : std::find(language_end + 1, end, 0);
        if (translated_end == end) throw InputError("PNG '" + path + "': malformed iTXt chunk");
        const unsigned char* body = translated_end + 1;
        text.emplace_back(std::move(keyword),
                          compressed ? inflate_text(body, end - body, path)
                                     : std::string(reinterpret_cast<const char*>(body), end - body));
      }
    }
    pos += 12 + static_cast<std::size_t>(length);
  }
  return text;
}

TextChunks read_image_text(const std::string& path) {
  const std::vector<unsigned char> bytes = read_file_bytes(path, "image");
  if (bytes.size() >= 8 && std::memcmp(bytes.data(), kPngSignature, 8) == 0) return read_png_text(path);
  TextChunks text;
  if (bytes.size() < 4 || bytes[0] != 0xFF || bytes[1] != 0xD8) return text;
  // Walk JPEG marker segments up to the start of scan.
  std::size_t pos = 2;
  while (pos + 4 <= bytes.size() && bytes[pos] == 0xFF) {
    const unsigned char marker = bytes[pos + 1];
    if (marker == 0xDA || marker == 0xD9) break;
    const std::size_t length = (std::size_t(bytes[pos + 2]) << 8) | bytes[pos + 3];
    if (length < 2 || pos + 2 + length > bytes.size()) throw InputError("JPEG '" + path + "' is truncated or corrupt");
    if (marker == 0xFE) {
      std::string payload(reinterpret_cast<const char*>(&bytes[pos + 4]), length - 2);
      const std::size_t colon = payload.find(": ");
      const bool keyed = colon != std::string::npos && colon > 0 &&
                         payload.find_first_of(" \t\r\n") > colon;
      if (keyed)
        text.emplace_back(payload.substr(0, colon), payload.substr(colon + 2));
      else
        text.emplace_back("comment", std::move(payload));
    }
    pos += 2 + length;
  }
  return text;
}

}  // namespace vdit
