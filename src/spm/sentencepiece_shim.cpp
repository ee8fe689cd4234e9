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
}  // namespace

extern "C" {

__attribute__((visibility("default"))) void* vdit_spm_load(const char* bytes, std::size_t size, char* error, std::size_t error_len) {
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
