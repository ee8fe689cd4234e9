// safetensors: memory-mapped, validated reader and a writer for every dtype the format names.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace vdit {

enum class StDType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2 };

const char* st_dtype_name(StDType t);                  // "F32", "F8_E4M3", ...
std::optional<StDType> st_dtype_from_name(const std::string& name);
std::size_t st_dtype_size(StDType t);                  // bytes per element
// The at::ScalarType a stored dtype is read as (fp8 has no LibTorch 1.13 type: read as f32).
at::ScalarType st_dtype_to_scalar(StDType t);
StDType st_dtype_from_scalar(at::ScalarType t);

// Exact conversion of one fp8 byte to float (NaN for the NaN encodings, ±inf for E5M2 inf).
float fp8_e4m3_to_float(std::uint8_t bits);
float fp8_e5m2_to_float(std::uint8_t bits);

struct TensorEntry {
  std::string name;
  StDType dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  // byte offsets relative to the data section
  std::uint64_t end = 0;
  std::int64_t numel() const;
};

struct SafetensorsHeader {
  std::vector<TensorEntry> entries;  // sorted by begin offset
  std::map<std::string, std::string> metadata;
  std::uint64_t data_offset = 0;  // 8 + header length
};

// Parses and validates a whole file image (header and data-section coverage) without touching the
// tensor bytes. `label` names the file in errors. Throws InputError with one line on any defect:
// header length beyond the file or absurd, invalid JSON, unknown dtype, bad shape, offsets out of
// range, overlapping or leaving gaps, shape x dtype size != byte length, truncated file.
SafetensorsHeader parse_safetensors(const std::uint8_t* data, std::size_t size, const std::string& label);

class MappedFile;  // read-only mmap, shared by every tensor view taken from it

class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  // For tests and fuzzing: the bytes of a file held in memory.
  static std::shared_ptr<SafetensorsFile> from_bytes(std::string bytes, const std::string& label);

  const std::string& path() const { return label_; }
  const std::vector<TensorEntry>& entries() const { return header_.entries; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  const TensorEntry* find(const std::string& name) const;

  // The tensor in its stored dtype (fp8 converted exactly to f32), on the CPU. Zero-copy view of
  // the mapping when the bytes are suitably aligned; the view keeps the mapping alive.
  at::Tensor tensor(const std::string& name) const;
  at::Tensor tensor(const TensorEntry& entry) const;
  const std::uint8_t* raw_bytes(const TensorEntry& entry) const;

 private:
  SafetensorsFile() = default;
  std::string label_;
  std::shared_ptr<MappedFile> map_;
  SafetensorsHeader header_;
  std::map<std::string, std::size_t> index_;
};

struct WriteEntry {
  std::string name;
  at::Tensor tensor;  // any device; copied to contiguous CPU bytes
  // Stored dtype when it differs from the tensor's: F8_* takes a u8 tensor of raw fp8 bytes.
  std::optional<StDType> stored_as;
};

// Writes atomically (temporary file in the same directory, then rename). Refuses to replace an
// existing file unless overwrite is true.
void write_safetensors(const std::string& path, const std::vector<WriteEntry>& tensors,
                       const std::map<std::string, std::string>& metadata = {}, bool overwrite = true);

}  // namespace vdit
