// libFuzzer target for the tokenizer model bytes (spiece.model, or a checkpoint's spiece_model
// tensor): the sentencepiece shim's load, as WanTokenizer::from_bytes calls it, then an encode of
// a fixed prompt with a model that loaded. A malformed model must be refused with an error, never
// crash. Only the shim is instrumented; sentencepiece itself is the system library.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

extern "C" {
void* vdit_spm_load(const char* bytes, std::size_t size, char* error, std::size_t error_len);
void vdit_spm_free(void* handle);
int vdit_spm_piece_size(void* handle);
int vdit_spm_encode(void* handle, const char* text, std::size_t size, int** ids, std::size_t* count, char* error,
                    std::size_t error_len);
void vdit_spm_free_ids(int* ids);
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  char error[512] = {0};
  void* processor = vdit_spm_load(reinterpret_cast<const char*>(data), size, error, sizeof error);
  if (!processor) return 0;
  (void)vdit_spm_piece_size(processor);
  static const char kPrompt[] = "a red circle moving right, &amp; a blue square";
  int* ids = nullptr;
  std::size_t count = 0;
  if (vdit_spm_encode(processor, kPrompt, sizeof kPrompt - 1, &ids, &count, error, sizeof error)) vdit_spm_free_ids(ids);
  vdit_spm_free(processor);
  return 0;
}
