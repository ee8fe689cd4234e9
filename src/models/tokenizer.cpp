#include "vdit/models/tokenizer.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <sstream>
#include <unordered_map>

#include "vdit/common.h"
#include "vdit/io/input_file.h"

namespace vdit {

namespace {

// ---- UTF-8 helpers -------------------------------------------------------------------------------

void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

std::string utf8(std::uint32_t cp) {
  std::string s;
  append_utf8(s, cp);
  return s;
}

// Decodes the code point starting at text[pos]; returns its byte length (>= 1). Malformed bytes
// decode as one unit with cp = 0xFFFFFFFF, so they are never taken for white space.
std::size_t decode_utf8(const std::string& text, std::size_t pos, std::uint32_t& cp) {
  const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(pos);
  std::size_t len = 0;
  if (lead < 0x80) {
    cp = lead;
    return 1;
  } else if ((lead & 0xE0) == 0xC0) {
    len = 2, cp = lead & 0x1F;
  } else if ((lead & 0xF0) == 0xE0) {
    len = 3, cp = lead & 0x0F;
  } else if ((lead & 0xF8) == 0xF0) {
    len = 4, cp = lead & 0x07;
  } else {
    cp = 0xFFFFFFFFu;
    return 1;
  }
  if (pos + len > text.size()) {
    cp = 0xFFFFFFFFu;
    return 1;
  }
  for (std::size_t i = 1; i < len; ++i) {
    if ((byte(pos + i) & 0xC0) != 0x80) {
      cp = 0xFFFFFFFFu;
      return 1;
    }
    cp = (cp << 6) | (byte(pos + i) & 0x3F);
  }
  return len;
}

// Python's str.isspace() / the \s of Wan's regex.
bool is_python_space(std::uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// ---- HTML character references ---------------------------------------------------------------

struct EntityTable {
  std::unordered_map<std::string, std::string> with_semicolon;  // "amp;" -> "&"
  std::unordered_map<std::string, std::string> legacy;          // accepted without ';': "amp" -> "&"
};

const EntityTable& entity_table() {
  static const EntityTable table = [] {
    EntityTable t;
    // HTML 4 Latin-1 entities, U+00A0..U+00FF in order. Python also accepts all of these without
    // the semicolon.
    static const char* const latin1[96] = {
        "nbsp",   "iexcl",  "cent",   "pound",  "curren", "yen",    "brvbar", "sect",
        "uml",    "copy",   "ordf",   "laquo",  "not",    "shy",    "reg",    "macr",
        "deg",    "plusmn", "sup2",   "sup3",   "acute",  "micro",  "para",   "middot",
        "cedil",  "sup1",   "ordm",   "raquo",  "frac14", "frac12", "frac34", "iquest",
        "Agrave", "Aacute", "Acirc",  "Atilde", "Auml",   "Aring",  "AElig",  "Ccedil",
        "Egrave", "Eacute", "Ecirc",  "Euml",   "Igrave", "Iacute", "Icirc",  "Iuml",
        "ETH",    "Ntilde", "Ograve", "Oacute", "Ocirc",  "Otilde", "Ouml",   "times",
        "Oslash", "Ugrave", "Uacute", "Ucirc",  "Uuml",   "Yacute", "THORN",  "szlig",
        "agrave", "aacute", "acirc",  "atilde", "auml",   "aring",  "aelig",  "ccedil",
        "egrave", "eacute", "ecirc",  "euml",   "igrave", "iacute", "icirc",  "iuml",
        "eth",    "ntilde", "ograve", "oacute", "ocirc",  "otilde", "ouml",   "divide",
        "oslash", "ugrave", "uacute", "ucirc",  "uuml",   "yacute", "thorn",  "yuml"};
    const auto add_legacy = [&t](const std::string& name, std::uint32_t cp) {
      t.legacy[name] = utf8(cp);
      t.with_semicolon[name + ";"] = utf8(cp);
    };
    for (std::uint32_t i = 0; i < 96; ++i) add_legacy(latin1[i], 0xA0 + i);
    add_legacy("amp", '&');
    add_legacy("AMP", '&');
    add_legacy("lt", '<');
    add_legacy("LT", '<');
    add_legacy("gt", '>');
    add_legacy("GT", '>');
    add_legacy("quot", '"');
    add_legacy("QUOT", '"');
    add_legacy("COPY", 0xA9);
    add_legacy("REG", 0xAE);

    // Semicolon-only names that show up in scraped captions.
    const std::pair<const char*, std::uint32_t> others[] = {
        {"apos", 0x27},     {"hellip", 0x2026}, {"mdash", 0x2014},  {"ndash", 0x2013},
        {"lsquo", 0x2018},  {"rsquo", 0x2019},  {"sbquo", 0x201A},  {"ldquo", 0x201C},
        {"rdquo", 0x201D},  {"bdquo", 0x201E},  {"dagger", 0x2020}, {"Dagger", 0x2021},
        {"bull", 0x2022},   {"permil", 0x2030}, {"prime", 0x2032},  {"Prime", 0x2033},
        {"lsaquo", 0x2039}, {"rsaquo", 0x203A}, {"oline", 0x203E},  {"frasl", 0x2044},
        {"euro", 0x20AC},   {"trade", 0x2122},  {"larr", 0x2190},   {"uarr", 0x2191},
        {"rarr", 0x2192},   {"darr", 0x2193},   {"harr", 0x2194},   {"minus", 0x2212},
        {"infin", 0x221E},  {"ne", 0x2260},     {"le", 0x2264},     {"ge", 0x2265},
        {"asymp", 0x2248},  {"sum", 0x2211},    {"prod", 0x220F},   {"radic", 0x221A},
        {"part", 0x2202},   {"nabla", 0x2207},  {"isin", 0x2208},   {"cap", 0x2229},
        {"cup", 0x222A},    {"int", 0x222B},    {"there4", 0x2234}, {"sim", 0x223C},
        {"equiv", 0x2261},  {"sdot", 0x22C5},   {"loz", 0x25CA},    {"spades", 0x2660},
        {"clubs", 0x2663},  {"hearts", 0x2665}, {"diams", 0x2666},  {"ensp", 0x2002},
        {"emsp", 0x2003},   {"thinsp", 0x2009}, {"zwnj", 0x200C},   {"zwj", 0x200D},
        {"lrm", 0x200E},    {"rlm", 0x200F},    {"circ", 0x2C6},    {"tilde", 0x2DC},
        {"fnof", 0x192},    {"OElig", 0x152},   {"oelig", 0x153},   {"Scaron", 0x160},
        {"scaron", 0x161},  {"Yuml", 0x178},    {"thetasym", 0x3D1}, {"upsih", 0x3D2},
        {"piv", 0x3D6},     {"nbsp", 0xA0},     {"Tab", 0x09},      {"NewLine", 0x0A},
        {"colon", ':'},     {"comma", ','},     {"period", '.'},    {"excl", '!'},
        {"quest", '?'},     {"num", '#'},       {"dollar", '$'},    {"percnt", '%'},
        {"lpar", '('},      {"rpar", ')'},      {"ast", '*'},       {"plus", '+'},
        {"sol", '/'},       {"semi", ';'},      {"equals", '='},    {"commat", '@'},
        {"lsqb", '['},      {"rsqb", ']'},      {"bsol", '\\'},     {"lowbar", '_'},
        {"grave", '`'},     {"lcub", '{'},      {"rcub", '}'},      {"verbar", '|'},
        {"Hat", '^'}};
    for (const auto& [name, cp] : others) t.with_semicolon[std::string(name) + ";"] = utf8(cp);
    // Greek capitals U+0391..U+03A9 (U+03A2 is unassigned; its small-letter slot is final sigma)
    // and small letters U+03B1..U+03C9.
    static const char* const greek[25] = {
        "alpha", "beta", "gamma", "delta",   "epsilon", "zeta", "eta", "theta", "iota",
        "kappa", "lambda", "mu",  "nu",      "xi",      "omicron", "pi", "rho", nullptr,
        "sigma", "tau",  "upsilon", "phi",   "chi",     "psi",  "omega"};
    for (std::uint32_t i = 0; i < 25; ++i) {
      if (greek[i] == nullptr) continue;
      std::string lower = greek[i];
      std::string upper = lower;
      upper[0] = static_cast<char>(upper[0] - 'a' + 'A');
      t.with_semicolon[upper + ";"] = utf8(0x391 + i);
      t.with_semicolon[lower + ";"] = utf8(0x3B1 + i);
    }
    t.with_semicolon["sigmaf;"] = utf8(0x3C2);
    return t;
  }();
  return table;
}

bool is_invalid_codepoint(std::uint32_t cp) {
  return (cp >= 0x1 && cp <= 0x8) || cp == 0xB || (cp >= 0xE && cp <= 0x1F) || (cp >= 0x7F && cp <= 0x9F) ||
         (cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE;
}

// Python html._replace_charref for a numeric reference value.
std::string numeric_reference(std::uint64_t num) {
  // 0x00, 0x0D and 0x80..0x9F: the replacements HTML5 prescribes (cp1252 for the C1 range; the
  // five positions cp1252 leaves undefined map to themselves).
  static const std::uint32_t c1[32] = {
      0x20AC, 0x81,   0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
      0x2039, 0x0152, 0x8D,   0x017D, 0x8F,   0x90,   0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
      0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x9D,   0x017E, 0x0178};
  if (num == 0) return utf8(0xFFFD);
  if (num == 0x0D) return "\r";
  if (num >= 0x80 && num <= 0x9F) return utf8(c1[num - 0x80]);
  if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF) return utf8(0xFFFD);
  if (is_invalid_codepoint(static_cast<std::uint32_t>(num))) return "";
  return utf8(static_cast<std::uint32_t>(num));
}

bool is_name_char(char c) {
  return c != '\t' && c != '\n' && c != '\f' && c != ' ' && c != '<' && c != '&' && c != '#' && c != ';';
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

std::string html_unescape(const std::string& text) {
  if (text.find('&') == std::string::npos) return text;
  const EntityTable& table = entity_table();
  std::string out;
  out.reserve(text.size());
  std::size_t i = 0;
  const std::size_t n = text.size();
  while (i < n) {
    if (text[i] != '&') {
      out += text[i++];
      continue;
    }
    std::size_t j = i + 1;
    if (j < n && text[j] == '#') {
      // &#123; or &#x7B; (the ';' is optional)
      const bool hex = j + 1 < n && (text[j + 1] == 'x' || text[j + 1] == 'X');
      std::size_t k = j + (hex ? 2 : 1);
      const std::size_t digits_begin = k;
      std::uint64_t num = 0;
      while (k < n && (hex ? hex_value(text[k]) >= 0 : (text[k] >= '0' && text[k] <= '9'))) {
        // Saturate: anything past U+10FFFF ends up as U+FFFD anyway.
        num = std::min<std::uint64_t>(num * (hex ? 16 : 10) + static_cast<std::uint64_t>(hex_value(text[k])),
                                      0x7FFFFFFFull);
        ++k;
      }
      if (k == digits_begin) {  // "&#" or "&#x" without digits: not a reference
        out += '&';
        i = j;
        continue;
      }
      if (k < n && text[k] == ';') ++k;
      out += numeric_reference(num);
      i = k;
      continue;
    }
    // Named: up to 32 characters of the name class, then an optional ';'.
    std::size_t k = j;
    int chars = 0;
    while (k < n && is_name_char(text[k]) && chars < 32) {
      std::uint32_t cp;
      k += decode_utf8(text, k, cp);
      ++chars;
    }
    k = std::min(k, n);
    if (k == j) {
      out += '&';
      i = j;
      continue;
    }
    const bool semicolon = k < n && text[k] == ';';
    const std::string name = text.substr(j, k - j);
    const std::size_t end = semicolon ? k + 1 : k;
    i = end;
    if (semicolon) {
      auto it = table.with_semicolon.find(name + ";");
      if (it != table.with_semicolon.end()) {
        out += it->second;
        continue;
      }
    } else {
      auto it = table.legacy.find(name);
      if (it != table.legacy.end()) {
        out += it->second;
        continue;
      }
    }
    // Longest prefix (at least 2 characters, shorter than the whole reference) that is a name
    // accepted without ';'; the rest stays as it was.
    const std::string whole = text.substr(j, end - j);
    bool replaced = false;
    for (std::size_t len = whole.size() - 1; len >= 2; --len) {
      auto it = table.legacy.find(whole.substr(0, len));
      if (it != table.legacy.end()) {
        out += it->second;
        out += whole.substr(len);
        replaced = true;
        break;
      }
    }
    if (!replaced) {
      out += '&';
      out += whole;
    }
  }
  return out;
}

std::string clean_prompt(const std::string& text) {
  const std::string unescaped = html_unescape(html_unescape(text));
  std::string out;
  out.reserve(unescaped.size());
  bool pending_space = false;
  std::size_t i = 0;
  while (i < unescaped.size()) {
    std::uint32_t cp;
    const std::size_t len = decode_utf8(unescaped, i, cp);
    if (is_python_space(cp)) {
      pending_space = !out.empty();  // leading white space is stripped
    } else {
      if (pending_space) out += ' ';
      pending_space = false;
      out.append(unescaped, i, len);
    }
    i += len;
  }
  return out;  // a trailing run leaves pending_space set and is dropped: stripped
}

// ---- WanTokenizer ------------------------------------------------------------------------------

namespace {

// The sentencepiece functions of libvdit_spm.so (see src/spm/sentencepiece_shim.cpp), loaded once.
struct SentencePieceApi {
  void* (*load)(const char*, std::size_t, char*, std::size_t) = nullptr;
  void (*free_processor)(void*) = nullptr;
  int (*piece_size)(void*) = nullptr;
  int (*eos_id)(void*) = nullptr;
  int (*pad_id)(void*) = nullptr;
  int (*encode)(void*, const char*, std::size_t, int**, std::size_t*, char*, std::size_t) = nullptr;
  void (*free_ids)(int*) = nullptr;
  std::size_t (*id_to_piece)(void*, int, char*, std::size_t) = nullptr;
};

const SentencePieceApi& sentencepiece_api() {
  static const SentencePieceApi api = [] {
    std::vector<std::string> candidates;
    if (const char* env = std::getenv("VDIT_SPM_SHIM")) candidates.emplace_back(env);
    char exe[4096];
    const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
      exe[n] = '\0';
      std::string dir(exe);
      dir = dir.substr(0, dir.rfind('/'));
      candidates.push_back(dir + "/libvdit_spm.so");
      candidates.push_back(dir + "/../lib/libvdit_spm.so");
    }
    // By name: the program's run path (a program built with find_package(vdit) has the installed
    // lib/ there), LD_LIBRARY_PATH and the system's library paths.
    candidates.emplace_back("libvdit_spm.so");
    // Where the build tree put it, for programs run from there.
#ifdef VDIT_SPM_SHIM_PATH
    candidates.emplace_back(VDIT_SPM_SHIM_PATH);
#endif
    void* handle = nullptr;
    std::string errors;
    for (const auto& path : candidates) {
      handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (handle) break;
      if (const char* e = ::dlerror()) errors = e;
    }
    if (!handle) throw RuntimeError("cannot load the sentencepiece module libvdit_spm.so (" + errors + ")");
    SentencePieceApi a;
    auto sym = [&](const char* name) {
      void* p = ::dlsym(handle, name);
      if (!p) throw RuntimeError(std::string("libvdit_spm.so lacks ") + name);
      return p;
    };
    a.load = reinterpret_cast<decltype(a.load)>(sym("vdit_spm_load"));
    a.free_processor = reinterpret_cast<decltype(a.free_processor)>(sym("vdit_spm_free"));
    a.piece_size = reinterpret_cast<decltype(a.piece_size)>(sym("vdit_spm_piece_size"));
    a.eos_id = reinterpret_cast<decltype(a.eos_id)>(sym("vdit_spm_eos_id"));
    a.pad_id = reinterpret_cast<decltype(a.pad_id)>(sym("vdit_spm_pad_id"));
    a.encode = reinterpret_cast<decltype(a.encode)>(sym("vdit_spm_encode"));
    a.free_ids = reinterpret_cast<decltype(a.free_ids)>(sym("vdit_spm_free_ids"));
    a.id_to_piece = reinterpret_cast<decltype(a.id_to_piece)>(sym("vdit_spm_id_to_piece"));
    return a;
  }();
  return api;
}

}  // namespace

struct WanTokenizer::Impl {
  void* processor = nullptr;
  std::string label;
  std::string serialized;
  ~Impl() {
    if (processor) sentencepiece_api().free_processor(processor);
  }
};

WanTokenizer::WanTokenizer(std::shared_ptr<const Impl> impl, std::int64_t max_len, const std::string& label)
    : impl_(std::move(impl)), max_len_(max_len) {
  if (max_len < 1) throw InputError(label + ": tokenizer max_len must be >= 1 (got " + std::to_string(max_len) + ")");
  const auto& api = sentencepiece_api();
  vocab_size_ = api.piece_size(impl_->processor);
  eos_id_ = api.eos_id(impl_->processor);
  if (eos_id_ < 0 || eos_id_ >= vocab_size_) throw InputError(label + ": sentencepiece model has no </s> (eos) piece");
  const int pad = api.pad_id(impl_->processor);
  pad_id_ = pad >= 0 ? pad : 0;
}

WanTokenizer WanTokenizer::from_file(const std::string& path, std::int64_t max_len) {
  check_input_path(path, "tokenizer model");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError("cannot open tokenizer model '" + path + "'");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw InputError("cannot read tokenizer model '" + path + "'");
  return from_bytes(bytes, max_len, "tokenizer model '" + path + "'");
}

WanTokenizer WanTokenizer::from_bytes(const std::string& bytes, std::int64_t max_len, const std::string& label) {
  if (bytes.empty()) throw InputError(label + ": empty sentencepiece model");
  auto impl = std::make_shared<Impl>();
  impl->label = label;
  char error[512] = {0};
  impl->processor = sentencepiece_api().load(bytes.data(), bytes.size(), error, sizeof error);
  if (!impl->processor) throw InputError(label + ": not a valid sentencepiece model (" + error + ")");
  impl->serialized = bytes;
  return WanTokenizer(std::move(impl), max_len, label);
}

WanTokenizer WanTokenizer::from_tensor(const at::Tensor& bytes, std::int64_t max_len, const std::string& label) {
  if (!bytes.defined() || bytes.scalar_type() != at::kByte || bytes.dim() != 1)
    throw InputError(label + ": expected a 1-D uint8 tensor of sentencepiece model bytes");
  const at::Tensor cpu = bytes.to(at::kCPU).contiguous();
  const std::string data(reinterpret_cast<const char*>(cpu.data_ptr<std::uint8_t>()),
                         static_cast<std::size_t>(cpu.numel()));
  return from_bytes(data, max_len, label);
}

std::vector<std::int64_t> WanTokenizer::piece_ids(const std::string& cleaned_text) const {
  int* ids = nullptr;
  std::size_t count = 0;
  char error[512] = {0};
  if (!sentencepiece_api().encode(impl_->processor, cleaned_text.data(), cleaned_text.size(), &ids, &count, error, sizeof error))
    throw RuntimeError(impl_->label + ": sentencepiece encode failed (" + error + ")");
  std::vector<std::int64_t> out(ids, ids + count);
  sentencepiece_api().free_ids(ids);
  return out;
}

std::string WanTokenizer::id_to_piece(std::int64_t id) const {
  if (id < 0 || id >= vocab_size_) throw InputError("token id " + std::to_string(id) + " outside the tokenizer's vocab");
  char buffer[256];
  const std::size_t length = sentencepiece_api().id_to_piece(impl_->processor, static_cast<int>(id), buffer, sizeof buffer);
  if (length < sizeof buffer) return std::string(buffer, length);
  std::string piece(length + 1, '\0');
  sentencepiece_api().id_to_piece(impl_->processor, static_cast<int>(id), piece.data(), piece.size());
  piece.resize(length);
  return piece;
}

std::string WanTokenizer::serialized_model() const { return impl_->serialized; }

std::vector<std::int64_t> WanTokenizer::truncated_with_eos(const std::string& prompt) const {
  std::vector<std::int64_t> ids = piece_ids(clean_prompt(prompt));
  // HF truncation with add_special_tokens keeps room for </s>.
  if (static_cast<std::int64_t>(ids.size()) > max_len_ - 1) ids.resize(static_cast<std::size_t>(max_len_ - 1));
  ids.push_back(eos_id_);
  return ids;
}

TokenizedPrompt WanTokenizer::encode(const std::string& prompt) const {
  TokenizedBatch batch = encode_batch({prompt});
  return TokenizedPrompt{batch.ids, batch.mask, batch.lengths[0]};
}

TokenizedBatch WanTokenizer::encode_batch(const std::vector<std::string>& prompts) const {
  const auto count = static_cast<std::int64_t>(prompts.size());
  TokenizedBatch batch;
  batch.ids = at::full({count, max_len_}, pad_id_, at::kLong);
  batch.mask = at::zeros({count, max_len_}, at::kLong);
  for (std::int64_t b = 0; b < count; ++b) {
    std::vector<std::int64_t> ids = truncated_with_eos(prompts[static_cast<std::size_t>(b)]);
    const auto length = static_cast<std::int64_t>(ids.size());
    batch.ids[b].narrow(0, 0, length).copy_(at::tensor(ids, at::kLong));
    batch.mask[b].narrow(0, 0, length).fill_(1);
    batch.lengths.push_back(length);
  }
  return batch;
}

}  // namespace vdit
