// safetensors reader/writer. The header is validated completely before any tensor is touched, so
// a corrupt file yields one InputError line and never a read outside the mapping.
#include "vdit/io/safetensors.h"

#include "vdit/common.h"
#include "vdit/io/input_file.h"
#include "vdit/io/output_file.h"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>

namespace vdit {

// ---------------------------------------------------------------------------------------------
// dtypes

namespace {
struct DTypeRow {
  StDType type;
  const char* name;
  std::size_t size;
};
constexpr std::array<DTypeRow, 12> kDTypes{{
    {StDType::F64, "F64", 8},     {StDType::F32, "F32", 4},         {StDType::F16, "F16", 2},
    {StDType::BF16, "BF16", 2},   {StDType::I64, "I64", 8},         {StDType::I32, "I32", 4},
    {StDType::I16, "I16", 2},     {StDType::I8, "I8", 1},           {StDType::U8, "U8", 1},
    {StDType::BOOL, "BOOL", 1},   {StDType::F8_E4M3, "F8_E4M3", 1}, {StDType::F8_E5M2, "F8_E5M2", 1},
}};
const DTypeRow& row(StDType t) {
  for (const auto& r : kDTypes)
    if (r.type == t) return r;
  throw RuntimeError("internal: unknown safetensors dtype");
}
}  // namespace

const char* st_dtype_name(StDType t) { return row(t).name; }
std::size_t st_dtype_size(StDType t) { return row(t).size; }

std::optional<StDType> st_dtype_from_name(const std::string& name) {
  for (const auto& r : kDTypes)
    if (name == r.name) return r.type;
  return std::nullopt;
}

at::ScalarType st_dtype_to_scalar(StDType t) {
  switch (t) {
    case StDType::F64: return at::kDouble;
    case StDType::F32: return at::kFloat;
    case StDType::F16: return at::kHalf;
    case StDType::BF16: return at::kBFloat16;
    case StDType::I64: return at::kLong;
    case StDType::I32: return at::kInt;
    case StDType::I16: return at::kShort;
    case StDType::I8: return at::kChar;
    case StDType::U8: return at::kByte;
    case StDType::BOOL: return at::kBool;
    case StDType::F8_E4M3:
    case StDType::F8_E5M2: return at::kFloat;
  }
  return at::kFloat;
}

StDType st_dtype_from_scalar(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return StDType::F64;
    case at::kFloat: return StDType::F32;
    case at::kHalf: return StDType::F16;
    case at::kBFloat16: return StDType::BF16;
    case at::kLong: return StDType::I64;
    case at::kInt: return StDType::I32;
    case at::kShort: return StDType::I16;
    case at::kChar: return StDType::I8;
    case at::kByte: return StDType::U8;
    case at::kBool: return StDType::BOOL;
    default: throw InputError(std::string("cannot store dtype ") + c10::toString(t) + " in safetensors");
  }
}

// fp8 E4M3 ("fn": no infinities, S.1111.111 is NaN), bias 7.
float fp8_e4m3_to_float(std::uint8_t bits) {
  const bool negative = bits & 0x80;
  const int exponent = (bits >> 3) & 0xF;
  const int mantissa = bits & 0x7;
  float magnitude;
  if (exponent == 0xF && mantissa == 0x7) {
    magnitude = std::numeric_limits<float>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -9);  // m/8 * 2^-6
  } else {
    magnitude = std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
  }
  return negative ? -magnitude : magnitude;
}

// fp8 E5M2 (IEEE-like), bias 15.
float fp8_e5m2_to_float(std::uint8_t bits) {
  const bool negative = bits & 0x80;
  const int exponent = (bits >> 2) & 0x1F;
  const int mantissa = bits & 0x3;
  float magnitude;
  if (exponent == 0x1F) {
    magnitude = mantissa == 0 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -16);  // m/4 * 2^-14
  } else {
    magnitude = std::ldexp(1.0f + static_cast<float>(mantissa) / 4.0f, exponent - 15);
  }
  return negative ? -magnitude : magnitude;
}

std::int64_t TensorEntry::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

// ---------------------------------------------------------------------------------------------
// header parsing

namespace {

constexpr std::uint64_t kMaxHeaderBytes = 100ull << 20;  // the format's own reference limit

[[noreturn]] void fail(const std::string& label, const std::string& what) {
  throw InputError(label + ": corrupt safetensors file: " + what);
}

std::uint64_t read_u64_le(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

SafetensorsHeader parse_safetensors(const std::uint8_t* data, std::size_t size, const std::string& label) {
  if (size < 8) fail(label, "file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  const std::uint64_t header_len = read_u64_le(data);
  if (header_len == 0) fail(label, "header length is 0");
  if (header_len > kMaxHeaderBytes) fail(label, "header length " + std::to_string(header_len) + " is absurd (over 100 MiB)");
  if (header_len > size - 8)
    fail(label, "header length " + std::to_string(header_len) + " runs past the end of the file (" + std::to_string(size) + " bytes)");

  const char* text = reinterpret_cast<const char*>(data + 8);
  // Top-level keys, to reject duplicates (a JSON library would silently keep one of them).
  std::set<std::string> seen;
  std::string duplicate;
  nlohmann::json::parser_callback_t on_event = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1) {
      const std::string key = parsed.get<std::string>();
      if (!seen.insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  nlohmann::json header = nlohmann::json::parse(text, text + header_len, on_event, /*allow_exceptions=*/false);
  if (header.is_discarded()) fail(label, "header is not valid JSON");
  if (!header.is_object()) fail(label, "header is not a JSON object");
  if (!duplicate.empty()) fail(label, "tensor '" + duplicate + "' appears twice in the header");

  SafetensorsHeader out;
  out.data_offset = 8 + header_len;
  const std::uint64_t data_size = size - out.data_offset;

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& value = it.value();
    if (name == "__metadata__") {
      if (!value.is_object()) fail(label, "__metadata__ is not an object");
      for (auto m = value.begin(); m != value.end(); ++m) {
        if (!m.value().is_string()) fail(label, "__metadata__ value '" + m.key() + "' is not a string");
        out.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!value.is_object()) fail(label, "tensor '" + name + "': entry is not an object");
    auto dtype_it = value.find("dtype");
    auto shape_it = value.find("shape");
    auto offsets_it = value.find("data_offsets");
    if (dtype_it == value.end() || !dtype_it->is_string()) fail(label, "tensor '" + name + "': missing or non-string dtype");
    if (shape_it == value.end() || !shape_it->is_array()) fail(label, "tensor '" + name + "': missing or non-array shape");
    if (offsets_it == value.end() || !offsets_it->is_array() || offsets_it->size() != 2)
      fail(label, "tensor '" + name + "': data_offsets must be an array of two integers");

    TensorEntry entry;
    entry.name = name;
    const std::string dtype_name = dtype_it->get<std::string>();
    auto dtype = st_dtype_from_name(dtype_name);
    if (!dtype) fail(label, "tensor '" + name + "': unknown dtype '" + dtype_name + "'");
    entry.dtype = *dtype;

    // Element count with overflow checks: a shape is only believable if it fits the file.
    unsigned __int128 numel = 1;
    for (const auto& dim : *shape_it) {
      if (!dim.is_number_unsigned()) fail(label, "tensor '" + name + "': shape holds a non-integer or negative value");
      const std::uint64_t d = dim.get<std::uint64_t>();
      if (d > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        fail(label, "tensor '" + name + "': dimension too large");
      entry.shape.push_back(static_cast<std::int64_t>(d));
      numel *= d;
      if (numel > (static_cast<unsigned __int128>(1) << 62)) fail(label, "tensor '" + name + "': shape is absurdly large");
    }
    for (const auto& off : *offsets_it)
      if (!off.is_number_unsigned()) fail(label, "tensor '" + name + "': data_offsets holds a non-integer or negative value");
    entry.begin = (*offsets_it)[0].get<std::uint64_t>();
    entry.end = (*offsets_it)[1].get<std::uint64_t>();
    if (entry.begin > entry.end) fail(label, "tensor '" + name + "': data_offsets begin > end");
    if (entry.end > data_size)
      fail(label, "tensor '" + name + "': data_offsets end " + std::to_string(entry.end) + " beyond the data section (" +
                      std::to_string(data_size) + " bytes; truncated file?)");
    const unsigned __int128 expected = numel * st_dtype_size(entry.dtype);
    if (expected != entry.end - entry.begin)
      fail(label, "tensor '" + name + "': shape x dtype size is " + std::to_string(static_cast<std::uint64_t>(expected)) +
                      " bytes but data_offsets span " + std::to_string(entry.end - entry.begin));
    out.entries.push_back(std::move(entry));
  }

  // The data section must be covered exactly: sorted by offset, no overlap, no gap, no tail.
  std::sort(out.entries.begin(), out.entries.end(), [](const TensorEntry& a, const TensorEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t cursor = 0;
  for (const auto& e : out.entries) {
    if (e.begin < cursor) fail(label, "tensor '" + e.name + "': data overlaps the previous tensor");
    if (e.begin > cursor) fail(label, "tensor '" + e.name + "': gap of " + std::to_string(e.begin - cursor) + " bytes before its data");
    cursor = e.end;
  }
  if (cursor != data_size)
    fail(label, std::to_string(data_size - cursor) + " bytes after the last tensor are not covered by any tensor");
  return out;
}

// ---------------------------------------------------------------------------------------------
// mapping

class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    check_input_path(path, "");  // before open(): a FIFO would block it
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw InputError(path + ": cannot open: " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      throw InputError(path + ": cannot stat: " + std::strerror(errno));
    }
    if (S_ISDIR(st.st_mode)) {
      ::close(fd);
      throw InputError(path + ": is a directory, not a safetensors file");
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      // Private, writable copy-on-write pages: a tensor viewing the mapping may be modified in
      // place by a caller without touching the file.
      void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        throw InputError(path + ": cannot map: " + std::strerror(errno));
      }
      data_ = static_cast<std::uint8_t*>(p);
    }
    ::close(fd);
  }
  struct InMemory {};
  MappedFile(InMemory, std::string bytes) : owned_(std::move(bytes)) {
    data_ = reinterpret_cast<std::uint8_t*>(owned_.data());
    size_ = owned_.size();
  }
  ~MappedFile() {
    if (data_ && owned_.empty() && size_ > 0) ::munmap(data_, size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  std::uint8_t* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  std::string owned_;
  std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
};

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->label_ = path;
  file->map_ = std::make_shared<MappedFile>(path);
  file->header_ = parse_safetensors(file->map_->data(), file->map_->size(), path);
  for (std::size_t i = 0; i < file->header_.entries.size(); ++i) file->index_[file->header_.entries[i].name] = i;
  return file;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::from_bytes(std::string bytes, const std::string& label) {
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->label_ = label;
  file->map_ = std::make_shared<MappedFile>(MappedFile::InMemory{}, std::move(bytes));
  file->header_ = parse_safetensors(file->map_->data(), file->map_->size(), label);
  for (std::size_t i = 0; i < file->header_.entries.size(); ++i) file->index_[file->header_.entries[i].name] = i;
  return file;
}

const TensorEntry* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &header_.entries[it->second];
}

const std::uint8_t* SafetensorsFile::raw_bytes(const TensorEntry& entry) const {
  return map_->data() + header_.data_offset + entry.begin;
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const TensorEntry* entry = find(name);
  if (!entry) throw InputError(label_ + ": no tensor named '" + name + "'");
  return tensor(*entry);
}

at::Tensor SafetensorsFile::tensor(const TensorEntry& entry) const {
  const std::uint8_t* bytes = raw_bytes(entry);
  const auto numel = entry.numel();
  if (entry.dtype == StDType::F8_E4M3 || entry.dtype == StDType::F8_E5M2) {
    // LibTorch 1.13 has no fp8 type: expand exactly to f32 through a 256-entry table.
    std::array<float, 256> table{};
    for (int b = 0; b < 256; ++b)
      table[b] = entry.dtype == StDType::F8_E4M3 ? fp8_e4m3_to_float(static_cast<std::uint8_t>(b))
                                                 : fp8_e5m2_to_float(static_cast<std::uint8_t>(b));
    at::Tensor out = at::empty(entry.shape, at::kFloat);
    float* dst = out.data_ptr<float>();
    for (std::int64_t i = 0; i < numel; ++i) dst[i] = table[bytes[i]];
    return out;
  }
  const auto scalar = st_dtype_to_scalar(entry.dtype);
  const std::size_t element = st_dtype_size(entry.dtype);
  auto options = at::TensorOptions().dtype(scalar);
  if (numel == 0) return at::empty(entry.shape, options);
  if (reinterpret_cast<std::uintptr_t>(bytes) % element == 0) {
    auto keep_alive = map_;
    return at::from_blob(const_cast<std::uint8_t*>(bytes), entry.shape, [keep_alive](void*) {}, options);
  }
  at::Tensor out = at::empty(entry.shape, options);
  std::memcpy(out.data_ptr(), bytes, numel * element);
  return out;
}

// ---------------------------------------------------------------------------------------------
// writer

void write_safetensors(const std::string& path, const std::vector<WriteEntry>& tensors,
                       const std::map<std::string, std::string>& metadata, bool overwrite) {
  namespace fs = std::filesystem;
  check_output_path(path, overwrite);

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = meta;
  }
  std::vector<at::Tensor> payloads;
  std::set<std::string> names;
  std::uint64_t offset = 0;
  for (const auto& t : tensors) {
    if (!names.insert(t.name).second) throw InputError("write_safetensors: duplicate tensor name '" + t.name + "'");
    at::Tensor cpu = t.tensor.detach().to(at::kCPU).contiguous();
    StDType stored = t.stored_as ? *t.stored_as : st_dtype_from_scalar(cpu.scalar_type());
    if ((stored == StDType::F8_E4M3 || stored == StDType::F8_E5M2) && cpu.scalar_type() != at::kByte)
      throw InputError("write_safetensors: '" + t.name + "' stored as fp8 needs a u8 tensor of raw fp8 bytes");
    if (!(stored == StDType::F8_E4M3 || stored == StDType::F8_E5M2) && stored != st_dtype_from_scalar(cpu.scalar_type()))
      throw InputError("write_safetensors: '" + t.name + "' stored_as differs from the tensor's dtype");
    const std::uint64_t bytes = static_cast<std::uint64_t>(cpu.numel()) * st_dtype_size(stored);
    nlohmann::ordered_json entry;
    entry["dtype"] = st_dtype_name(stored);
    entry["shape"] = cpu.sizes().vec();
    entry["data_offsets"] = {offset, offset + bytes};
    header[t.name] = entry;
    offset += bytes;
    payloads.push_back(cpu);
  }
  std::string header_text = header.dump();
  while ((8 + header_text.size()) % 8 != 0) header_text.push_back(' ');  // align the data section

  // Through AtomicOutput: the temporary is registered for the SIGINT/SIGTERM cleanup and the
  // target is replaced only when it is a regular file.
  AtomicOutput out(path, overwrite);
  std::uint8_t len_bytes[8];
  std::uint64_t len = header_text.size();
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<std::uint8_t>(len >> (8 * i));
  out.write(len_bytes, 8);
  out.write(header_text.data(), header_text.size());
  for (const auto& p : payloads) out.write(p.data_ptr(), static_cast<std::size_t>(p.numel() * p.element_size()));
  out.commit();
}

}  // namespace vdit
