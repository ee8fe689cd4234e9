// A C interface over libsentencepiece, built as its own shared object (libvdit_spm.so) and loaded
// with dlopen(RTLD_DEEPBIND) by the tokenizer.
//
// Why: Debian's libsentencepiece carries a private copy of protobuf-lite 3.14, exporting the same
// symbols as the system libprotobuf 3.21 that LibTorch pulls in. Linked into one executable, one
// of the two libraries always binds to the other's functions: either protobuf's start-up code
// crashes, or sentencepiece's version check aborts. Loaded with RTLD_DEEPBIND, sentencepiece
// resolves its protobuf symbols to its own copy and never meets LibTorch's.
#include <sentencepiece_processor.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {
void copy_error(const std::string& message, char* error, std::size_t error_len) {
  if (!error || error_len == 0) return;
  std::strncpy(error, message.c_str(), error_len - 1);
  error[error_len - 1] = '\0';
}
// libsentencepiece trusts a model's precompiled_charsmap (its normaliser's character map: a
// darts-clone trie, then the replacement strings): a corrupt one loads, and the first Encode reads
// out of bounds (tests/fuzz/known-crashes). So before handing the bytes over, every charsmap in the
// model's normalizer_spec / denormalizer_spec is checked as the trie lookup will use it.
bool read_varint(const unsigned char*& p, const unsigned char* end, std::uint64_t& value) {
  value = 0;
  for (int shift = 0; shift < 64 && p < end; shift += 7) {
    const unsigned char b = *p++;
    value |= static_cast<std::uint64_t>(b & 0x7F) << shift;
    if (!(b & 0x80)) return true;
  }
  return false;
}

// Calls on_field(number, data, size) for each length-delimited field of a protobuf message;
// false where the message is not well formed (sentencepiece then refuses it itself).
template <typename F>
bool each_bytes_field(const unsigned char* p, const unsigned char* end, F on_field) {
  while (p < end) {
    std::uint64_t key = 0, value = 0;
    if (!read_varint(p, end, key)) return false;
    switch (key & 7) {
      case 0: if (!read_varint(p, end, value)) return false; break;
      case 1: if (end - p < 8) return false; p += 8; break;
      case 5: if (end - p < 4) return false; p += 4; break;
      case 2:
        if (!read_varint(p, end, value) || value > static_cast<std::uint64_t>(end - p)) return false;
        on_field(key >> 3, p, static_cast<std::size_t>(value));
        p += value;
        break;
      default: return false;
    }
  }
  return true;
}

// The trie's units as Darts::DoubleArray reads them: from any unit that is not a value unit the
// lookup goes to (index ^ offset ^ byte) for any byte, and a unit with a leaf stores its value (an
// offset into the strings, NUL-terminated there) at (index ^ offset). darts-clone builds tries of
// whole 256-unit blocks, so every such block must lie inside the trie.
bool charsmap_ok(const unsigned char* blob, std::size_t size) {
  if (size <= 4) return false;
  std::uint32_t trie_size = 0;
  std::memcpy(&trie_size, blob, 4);
  if (trie_size >= size - 4 || trie_size % 4 != 0 || trie_size == 0) return false;
  const std::size_t units = trie_size / 4;
  const unsigned char* strings = blob + 4 + trie_size;
  const std::size_t strings_size = size - 4 - trie_size;
  auto unit = [&](std::size_t i) {
    std::uint32_t u = 0;
    std::memcpy(&u, blob + 4 + 4 * i, 4);
    return u;
  };
  for (std::size_t i = 0; i < units; ++i) {
    const std::uint32_t u = unit(i);
    if (u & (1U << 31)) continue;  // a value unit: no byte matches its label, the lookup stops there
    const std::size_t base = i ^ ((u >> 10) << ((u & (1U << 9)) >> 6));
    if ((base | 0xFF) >= units) return false;
    if ((u >> 8) & 1) {
      const std::uint32_t v = unit(base) & ((1U << 31) - 1);
      if (v >= strings_size || !std::memchr(strings + v, '\0', strings_size - v)) return false;
    }
  }
  return true;
}

// Empty when every charsmap is sound (or there is none: sentencepiece then uses its built-in one).
std::string check_charsmaps(const char* bytes, std::size_t size) {
  const auto* begin = reinterpret_cast<const unsigned char*>(bytes);
  std::string problem;
  each_bytes_field(begin, begin + size, [&](std::uint64_t field, const unsigned char* spec, std::size_t spec_size) {
    if (field != 3 && field != 5) return;  // ModelProto.normalizer_spec, .denormalizer_spec
    each_bytes_field(spec, spec + spec_size, [&](std::uint64_t f, const unsigned char* map, std::size_t map_size) {
      if (f == 2 && map_size > 0 && !charsmap_ok(map, map_size))  // NormalizerSpec.precompiled_charsmap
        problem = std::string(field == 3 ? "normalizer" : "denormalizer") + " precompiled_charsmap is corrupt";
    });
  });
  return problem;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) void* vdit_spm_load(const char* bytes, std::size_t size, char* error, std::size_t error_len) {
  if (const std::string problem = check_charsmaps(bytes, size); !problem.empty()) {
    copy_error(problem, error, error_len);
    return nullptr;
  }
  auto* processor = new sentencepiece::SentencePieceProcessor();
  const auto status = processor->LoadFromSerializedProto(std::string(bytes, size));
  if (!status.ok()) {
    copy_error(status.ToString(), error, error_len);
    delete processor;
    return nullptr;
  }
  return processor;
}

__attribute__((visibility("default"))) void vdit_spm_free(void* handle) {
  delete static_cast<sentencepiece::SentencePieceProcessor*>(handle);
}

__attribute__((visibility("default"))) int vdit_spm_piece_size(void* handle) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(handle)->GetPieceSize();
}
__attribute__((visibility("default"))) int vdit_spm_eos_id(void* handle) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(handle)->eos_id();
}
__attribute__((visibility("default"))) int vdit_spm_pad_id(void* handle) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(handle)->pad_id();
}

// Encodes `text`; on success *ids is a malloc'ed array (free with vdit_spm_free_ids).
__attribute__((visibility("default"))) int vdit_spm_encode(void* handle, const char* text, std::size_t size, int** ids,
                                                           std::size_t* count, char* error, std::size_t error_len) {
  std::vector<int> out;
  const auto status = static_cast<sentencepiece::SentencePieceProcessor*>(handle)->Encode(std::string(text, size), &out);
  if (!status.ok()) {
    copy_error(status.ToString(), error, error_len);
    return 0;
  }
  *count = out.size();
  *ids = static_cast<int*>(std::malloc(sizeof(int) * (out.empty() ? 1 : out.size())));
  if (!out.empty()) std::memcpy(*ids, out.data(), sizeof(int) * out.size());
  return 1;
}

__attribute__((visibility("default"))) void vdit_spm_free_ids(int* ids) { std::free(ids); }

// Writes the piece (NUL-terminated, truncated to out_len-1) and returns its full length.
__attribute__((visibility("default"))) std::size_t vdit_spm_id_to_piece(void* handle, int id, char* out, std::size_t out_len) {
  const std::string piece = static_cast<sentencepiece::SentencePieceProcessor*>(handle)->IdToPiece(id);
  copy_error(piece, out, out_len);
  return piece.size();
}

}  // extern "C"
