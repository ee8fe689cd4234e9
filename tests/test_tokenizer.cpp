// Wan prompt cleaning and the sentencepiece tokenizer wrapper, on a tiny unigram model trained for
// these tests (tests/fixtures/tokenizer/README.md says how).
#include <catch2/catch.hpp>

#include <fstream>
#include <iterator>

#include "vdit/common.h"
#include "vdit/models/tokenizer.h"

using namespace vdit;

namespace {

const std::string kModelPath = std::string(VDIT_FIXTURES_DIR) + "/tokenizer/tiny_unigram.model";

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::vector<std::int64_t> row(const at::Tensor& t, std::int64_t b = 0) {
  const at::Tensor r = t[b].contiguous();
  return std::vector<std::int64_t>(r.data_ptr<std::int64_t>(), r.data_ptr<std::int64_t>() + r.numel());
}

}  // namespace

TEST_CASE("html_unescape follows Python's html.unescape", "[tokenizer]") {
  CHECK(html_unescape("no references") == "no references");
  CHECK(html_unescape("&amp; &lt;b&gt; &quot;q&quot; &apos;a&apos;") == "& <b> \"q\" 'a'");
  CHECK(html_unescape("&amp;amp;") == "&amp;");  // one level per call
  CHECK(html_unescape("&#65;&#x42;&#X43&#68") == "ABCD");
  CHECK(html_unescape("&#0;") == "\xEF\xBF\xBD");         // NUL -> U+FFFD
  CHECK(html_unescape("&#128;") == "\xE2\x82\xAC");       // cp1252 0x80 -> euro sign
  CHECK(html_unescape("&#x81;") == "\xC2\x81");           // undefined in cp1252: kept as U+0081
  CHECK(html_unescape("&#xD800;") == "\xEF\xBF\xBD");     // surrogate
  CHECK(html_unescape("&#x110000;") == "\xEF\xBF\xBD");   // beyond Unicode
  CHECK(html_unescape("&#99999999999999999999;") == "\xEF\xBF\xBD");
  CHECK(html_unescape("a&#1;b&#xFFFF;c") == "abc");       // non-characters vanish
  CHECK(html_unescape("&#x; &#; & x &") == "&#x; &#; & x &");
  CHECK(html_unescape("&ampx &copy 2024") == "&x \xC2\xA9 2024");  // legacy names need no ';'
  CHECK(html_unescape("&notit;") == "\xC2\xAC" "it;");             // longest legacy prefix
  CHECK(html_unescape("&hellip; &hellip") == "\xE2\x80\xA6 &hellip");  // ';' required here
  CHECK(html_unescape("&Eacute;t&eacute; &alpha;&Omega;&sigmaf;") == "\xC3\x89t\xC3\xA9 \xCE\xB1\xCE\xA9\xCF\x82");
  CHECK(html_unescape("&nosuchentity; &AMP;") == "&nosuchentity; &");
}

TEST_CASE("clean_prompt unescapes twice and collapses Unicode white space", "[tokenizer]") {
  CHECK(clean_prompt("  Hello,\t\n world \xE3\x80\x80 again\xC2\xA0 ") == "Hello, world again");
  CHECK(clean_prompt("&amp;lt;tag&amp;gt;") == "<tag>");
  CHECK(clean_prompt("a&nbsp;&nbsp;b") == "a b");  // the unescaped NBSPs are white space too
  CHECK(clean_prompt("\r\n\t ") == "");
  CHECK(clean_prompt("\xE8\x89\xB2\xE8\xB0\x83 \xE8\x89\xB3") == "\xE8\x89\xB2\xE8\xB0\x83 \xE8\x89\xB3");
  CHECK(clean_prompt("bad \xFF\xFE utf8") == "bad \xFF\xFE utf8");  // passed through untouched
}

TEST_CASE("WanTokenizer appends </s>, pads with 0 and masks the real tokens", "[tokenizer]") {
  const WanTokenizer tok = WanTokenizer::from_file(kModelPath);
  REQUIRE(tok.eos_id() == 1);
  REQUIRE(tok.pad_id() == 0);
  REQUIRE(tok.max_len() == 512);
  CHECK(tok.id_to_piece(1) == "</s>");

  const std::string prompt = "A red fox jumps over the old bridge, cinematic lighting.";
  const std::vector<std::int64_t> pieces = tok.piece_ids(prompt);
  REQUIRE(pieces.size() > 5);
  const TokenizedPrompt t = tok.encode(prompt);
  CHECK(t.ids.sizes() == at::IntArrayRef({1, 512}));
  CHECK(t.mask.sizes() == at::IntArrayRef({1, 512}));
  CHECK(t.ids.scalar_type() == at::kLong);
  CHECK(t.mask.scalar_type() == at::kLong);
  REQUIRE(t.length == static_cast<std::int64_t>(pieces.size()) + 1);
  const auto ids = row(t.ids);
  const auto mask = row(t.mask);
  for (std::size_t i = 0; i < pieces.size(); ++i) CHECK(ids[i] == pieces[i]);
  CHECK(ids[pieces.size()] == 1);
  for (std::int64_t i = 0; i < 512; ++i) {
    if (i < t.length) {
      CHECK(mask[i] == 1);
    } else {
      CHECK(ids[i] == 0);
      CHECK(mask[i] == 0);
    }
  }
  // No </s> before the end and no padding inside the real tokens.
  for (std::int64_t i = 0; i + 1 < t.length; ++i) {
    CHECK(ids[i] != 1);
    CHECK(ids[i] != 0);
  }

  const TokenizedPrompt empty = tok.encode("  \t ");
  CHECK(empty.length == 1);
  CHECK(row(empty.ids)[0] == 1);
  CHECK(empty.mask.sum().item<std::int64_t>() == 1);
}

TEST_CASE("WanTokenizer truncates to max_len-1 pieces plus </s>", "[tokenizer]") {
  std::string prompt;
  for (int i = 0; i < 300; ++i) prompt += "a white horse runs across the desert canyon ";
  const WanTokenizer tok = WanTokenizer::from_file(kModelPath);
  const std::vector<std::int64_t> pieces = tok.piece_ids(clean_prompt(prompt));
  REQUIRE(pieces.size() > 600);
  const TokenizedPrompt t = tok.encode(prompt);
  CHECK(t.length == 512);
  const auto ids = row(t.ids);
  CHECK(ids[511] == 1);
  CHECK(std::vector<std::int64_t>(ids.begin(), ids.begin() + 511) ==
        std::vector<std::int64_t>(pieces.begin(), pieces.begin() + 511));
  CHECK(t.mask.sum().item<std::int64_t>() == 512);

  const WanTokenizer short_tok = WanTokenizer::from_file(kModelPath, 8);
  const TokenizedPrompt s = short_tok.encode(prompt);
  CHECK(s.ids.sizes() == at::IntArrayRef({1, 8}));
  CHECK(s.length == 8);
  CHECK(row(s.ids) == std::vector<std::int64_t>{pieces[0], pieces[1], pieces[2], pieces[3], pieces[4], pieces[5],
                                                pieces[6], 1});
  CHECK_THROWS_AS(WanTokenizer::from_file(kModelPath, 0), InputError);
}

TEST_CASE("WanTokenizer cleans the prompt before encoding", "[tokenizer]") {
  const WanTokenizer tok = WanTokenizer::from_file(kModelPath);
  const TokenizedPrompt messy = tok.encode("  An owl &amp;amp; a panda\t\n\tsleep   under a bamboo&nbsp;grove  ");
  const TokenizedPrompt clean = tok.encode("An owl & a panda sleep under a bamboo grove");
  CHECK(messy.length == clean.length);
  CHECK(at::equal(messy.ids, clean.ids));
  CHECK(at::equal(messy.mask, clean.mask));
  // Without the cleaning the entity text would be tokenized literally.
  CHECK(tok.piece_ids("&amp;amp;") != tok.piece_ids("&"));
}

TEST_CASE("WanTokenizer from bytes and from a u8 tensor equals from file", "[tokenizer]") {
  const std::string bytes = read_bytes(kModelPath);
  const WanTokenizer from_file = WanTokenizer::from_file(kModelPath);
  const WanTokenizer from_bytes = WanTokenizer::from_bytes(bytes);
  const at::Tensor u8 =
      at::from_blob(const_cast<char*>(bytes.data()), {static_cast<std::int64_t>(bytes.size())}, at::kByte).clone();
  const WanTokenizer from_tensor = WanTokenizer::from_tensor(u8);
  CHECK(from_bytes.vocab_size() == from_file.vocab_size());
  CHECK(from_tensor.vocab_size() == from_file.vocab_size());
  CHECK(from_bytes.serialized_model() == from_file.serialized_model());
  const std::vector<std::string> prompts = {
      "A cat sleeping on a sofa; the camera pans left.", "Café scene in Paris, crème brûlée.",
      "\xE8\x89\xB2\xE8\xB0\x83\xE8\x89\xB3\xE4\xB8\xBD\xEF\xBC\x8C\xE8\xBF\x87\xE6\x9B\x9D", "UNSEEN wörds qzxj 12345"};
  const TokenizedBatch a = from_file.encode_batch(prompts);
  const TokenizedBatch b = from_bytes.encode_batch(prompts);
  const TokenizedBatch c = from_tensor.encode_batch(prompts);
  CHECK(at::equal(a.ids, b.ids));
  CHECK(at::equal(a.ids, c.ids));
  CHECK(at::equal(a.mask, b.mask));
  CHECK(a.lengths == b.lengths);
  CHECK(a.lengths == c.lengths);
}

TEST_CASE("WanTokenizer encode_batch stacks single encodes", "[tokenizer]") {
  const WanTokenizer tok = WanTokenizer::from_file(kModelPath);
  const std::vector<std::string> prompts = {"Ocean waves crash against black volcanic rocks.", "", "A koala."};
  const TokenizedBatch batch = tok.encode_batch(prompts);
  REQUIRE(batch.ids.sizes() == at::IntArrayRef({3, 512}));
  REQUIRE(batch.lengths.size() == 3);
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    const TokenizedPrompt one = tok.encode(prompts[i]);
    CHECK(batch.lengths[i] == one.length);
    CHECK(at::equal(batch.ids[static_cast<std::int64_t>(i)], one.ids[0]));
    CHECK(at::equal(batch.mask[static_cast<std::int64_t>(i)], one.mask[0]));
  }
  CHECK(tok.encode_batch({}).ids.size(0) == 0);
}

TEST_CASE("WanTokenizer reports unusable models as InputError", "[tokenizer]") {
  CHECK_THROWS_AS(WanTokenizer::from_file("/nonexistent/spiece.model"), InputError);
  CHECK_THROWS_AS(WanTokenizer::from_bytes(""), InputError);
  CHECK_THROWS_AS(WanTokenizer::from_bytes(std::string("this is not a protobuf \x01\x02\x03", 26)), InputError);
  CHECK_THROWS_AS(WanTokenizer::from_tensor(at::zeros({4}, at::kFloat)), InputError);
  CHECK_THROWS_AS(WanTokenizer::from_tensor(at::zeros({2, 2}, at::kByte)), InputError);
  // Found by tests/fuzz/fuzz_spm_model: tiny_unigram.model with four bytes of its character map's
  // trie swapped loaded, then libsentencepiece read out of bounds on the first encode (SEGV).
  const std::string corrupt = std::string(VDIT_FIXTURES_DIR) + "/tokenizer/corrupt_charsmap.model";
  CHECK_THROWS_AS(WanTokenizer::from_file(corrupt), InputError);
  CHECK_THROWS_WITH(WanTokenizer::from_file(corrupt), Catch::Contains("precompiled_charsmap is corrupt"));
  try {
    WanTokenizer::from_file("/nonexistent/spiece.model");
  } catch (const InputError& e) {
    CHECK_THAT(e.what(), Catch::Contains("/nonexistent/spiece.model"));
  }
}
