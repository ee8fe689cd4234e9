// The umT5 tokenizer as Wan2.1 drives it: prompt cleaning, sentencepiece (unigram) encoding,
// </s> appended, truncation and zero padding to a fixed length with a mask.
//
// Wan runs `ftfy.fix_text`, `html.unescape` twice, strip, collapses whitespace runs, then the HF
// tokenizer. Here ftfy is NOT reproduced (no port exists): mojibake repair, the
// curly-quote/ligature/width fixes and the removal of control characters that ftfy does are skipped,
// so prompts containing such damage can tokenize differently. Raw libsentencepiece is used in place
// of the HF fast tokenizer; both apply the model's own normaliser, but the two are not
// proven identical on every input (no HF tokenizer is available here to compare against).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace vdit {

// Python's html.unescape: numeric references (&#65; &#x41;, with or without ';', with its rules for
// invalid code points: NUL / surrogates / > U+10FFFF -> U+FFFD, 0x80-0x9F via cp1252, other
// non-characters dropped) and named references. Named: the whole HTML 4 Latin-1 set plus
// &amp; &lt; &gt; &quot; (also without ';', where Python accepts that, incl. the longest-prefix rule
// "&ampx" -> "&x") and a set of common others (&apos; &hellip; dashes, quotes, Greek letters,
// arrows, ...). Names outside that table, which Python's full HTML5 table (2231 names) would decode,
// are left as they are.
std::string html_unescape(const std::string& text);

// Wan's 'whitespace' cleaning minus ftfy: html_unescape twice, then every run of Unicode white
// space (Python's \s: ASCII space/tab/newlines, \x1c-\x1f, U+0085, U+00A0, U+1680, U+2000-U+200A,
// U+2028/9, U+202F, U+205F, U+3000) becomes one ' ', and the ends are stripped.
std::string clean_prompt(const std::string& text);

struct TokenizedPrompt {
  at::Tensor ids;   // [1, max_len] int64
  at::Tensor mask;  // [1, max_len] int64, 1 on real tokens incl. </s>
  std::int64_t length = 0;
};

struct TokenizedBatch {
  at::Tensor ids;   // [B, max_len] int64
  at::Tensor mask;  // [B, max_len] int64
  std::vector<std::int64_t> lengths;
};

class WanTokenizer {
 public:
  static constexpr std::int64_t kDefaultMaxLen = 512;

  // A sentencepiece model file (spiece.model). Throws InputError naming the file.
  static WanTokenizer from_file(const std::string& path, std::int64_t max_len = kDefaultMaxLen);
  // Serialized ModelProto bytes (what spiece.model holds). `label` names the source in errors.
  static WanTokenizer from_bytes(const std::string& bytes, std::int64_t max_len = kDefaultMaxLen,
                                 const std::string& label = "sentencepiece model bytes");
  // ComfyUI's `spiece_model` tensor: a 1-D uint8 tensor of those bytes.
  static WanTokenizer from_tensor(const at::Tensor& bytes, std::int64_t max_len = kDefaultMaxLen,
                                  const std::string& label = "spiece_model tensor");

  // clean_prompt + pieces + </s>, truncated to max_len-1 pieces + </s>, padded with pad_id.
  TokenizedPrompt encode(const std::string& prompt) const;
  TokenizedBatch encode_batch(const std::vector<std::string>& prompts) const;

  // Sentencepiece ids of already-cleaned text, no </s>, no truncation.
  std::vector<std::int64_t> piece_ids(const std::string& cleaned_text) const;
  std::string id_to_piece(std::int64_t id) const;

  std::int64_t eos_id() const { return eos_id_; }  // the model's </s> (1 for umT5)
  std::int64_t pad_id() const { return pad_id_; }  // the model's <pad> (0 for umT5), 0 if it has none
  std::int64_t vocab_size() const { return vocab_size_; }  // number of pieces
  std::int64_t max_len() const { return max_len_; }
  // The serialized model (identical for file and byte loads of the same model).
  std::string serialized_model() const;

 private:
  struct Impl;
  WanTokenizer(std::shared_ptr<const Impl> impl, std::int64_t max_len, const std::string& label);
  std::vector<std::int64_t> truncated_with_eos(const std::string& prompt) const;
  std::shared_ptr<const Impl> impl_;
  std::int64_t max_len_ = kDefaultMaxLen;
  std::int64_t eos_id_ = 1;
  std::int64_t pad_id_ = 0;
  std::int64_t vocab_size_ = 0;
};

}  // namespace vdit
