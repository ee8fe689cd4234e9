// Malformed safetensors files for the validation tests and the shipped corpus
// (tests/fixtures/malformed/*.safetensors). Each case is a whole file image and the phrase its
// one-line error must contain.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vdit_test {

struct MalformedCase {
  std::string name;
  std::string bytes;
  std::string expected_error;  // substring of the InputError message
};

inline std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xFF);
  return s;
}

// A file image with the given header text and `data_bytes` bytes of data.
inline std::string st_image(const std::string& header, std::size_t data_bytes) {
  return le64(header.size()) + header + std::string(data_bytes, '\x11');
}

inline std::vector<MalformedCase> malformed_safetensors_cases() {
  const std::string ok_entry = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  std::vector<MalformedCase> c;
  c.push_back({"empty", "", "shorter than the 8-byte header length"});
  c.push_back({"five_bytes", "\x01\x02\x03\x04\x05", "shorter than the 8-byte header length"});
  c.push_back({"header_len_zero", le64(0) + "{}", "header length is 0"});
  c.push_back({"header_len_past_end", le64(64) + "{}", "runs past the end of the file"});
  c.push_back({"header_len_absurd", le64(1ull << 40) + std::string(16, ' '), "is absurd"});
  c.push_back({"invalid_json", st_image("{\"a\":{\"dtype\":", 0), "not valid JSON"});
  c.push_back({"json_trailing_garbage", st_image("{" + ok_entry + "}xyz", 8), "not valid JSON"});
  c.push_back({"json_array", st_image("[1,2,3]", 0), "not a JSON object"});
  c.push_back({"entry_not_object", st_image(R"({"a":[1,2]})", 0), "entry is not an object"});
  c.push_back({"unknown_dtype", st_image(R"({"a":{"dtype":"F12","shape":[2],"data_offsets":[0,8]}})", 8), "unknown dtype 'F12'"});
  c.push_back({"missing_dtype", st_image(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8), "missing or non-string dtype"});
  c.push_back({"missing_shape", st_image(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", 8), "missing or non-array shape"});
  c.push_back({"negative_dim", st_image(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "non-integer or negative"});
  c.push_back({"fractional_dim", st_image(R"({"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,8]}})", 8), "non-integer or negative"});
  c.push_back({"absurd_shape", st_image(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8), "absurdly large"});
  c.push_back({"offsets_three", st_image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4,8]}})", 8), "array of two integers"});
  c.push_back({"offsets_negative", st_image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8), "non-integer or negative"});
  c.push_back({"offsets_reversed", st_image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8), "begin > end"});
  c.push_back({"offsets_past_data", st_image(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8), "beyond the data section"});
  c.push_back({"size_mismatch", st_image(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "shape x dtype size is 12 bytes"});
  c.push_back({"overlap", st_image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12), "overlaps"});
  c.push_back({"gap", st_image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})", 16), "gap of 4 bytes"});
  c.push_back({"data_not_from_zero", st_image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "gap of 4 bytes"});
  c.push_back({"trailing_bytes", st_image("{" + ok_entry + "}", 12), "not covered by any tensor"});
  c.push_back({"truncated_data", st_image(R"({"a":{"dtype":"F32","shape":[256],"data_offsets":[0,1024]}})", 100), "truncated file?"});
  c.push_back({"metadata_not_object", st_image(R"({"__metadata__":"x",)" + ok_entry + "}", 8), "__metadata__ is not an object"});
  c.push_back({"metadata_value_number", st_image(R"({"__metadata__":{"k":1},)" + ok_entry + "}", 8), "is not a string"});
  c.push_back({"duplicate_name", st_image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "appears twice"});
  c.push_back({"dtype_not_string", st_image(R"({"a":{"dtype":7,"shape":[2],"data_offsets":[0,8]}})", 8), "missing or non-string dtype"});
  return c;
}

}  // namespace vdit_test
