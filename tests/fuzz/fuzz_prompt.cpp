// libFuzzer target for the prompt cleaning vdit does itself before sentencepiece sees the text:
// clean_prompt (html_unescape twice, Unicode white-space runs collapsed, ends stripped) on any
// bytes, which need not be valid UTF-8. It must return, never crash or read out of bounds.
#include "vdit/models/tokenizer.h"

#include <cstddef>
#include <cstdint>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  (void)vdit::clean_prompt(text);
  (void)vdit::html_unescape(text);
  return 0;
}
