#include "safetensors_corpus.h"
#include "vdit/common.h"
#include "vdit/io/checkpoint.h"
#include "vdit/io/safetensors.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <unistd.h>  // getpid: LibTorch 1.13 brought it in, 2.x does not

// Last: LibTorch headers pull in glog, whose CHECK macro must not replace Catch's.
#include <catch2/catch.hpp>

namespace fs = std::filesystem;
using namespace vdit;

namespace {

fs::path temp_dir(const std::string& name) {
  fs::path dir = fs::temp_directory_path() / ("vdit-test-" + name + "-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir;
}

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

// Independent decoding of fp8 by assembling IEEE-754 binary32 bits directly (the library uses
// ldexp arithmetic), so the two must agree on all 256 codes.
float fp8_by_bits(std::uint8_t code, int exp_bits, int man_bits, int bias, bool has_inf) {
  const std::uint32_t sign = (code >> 7) & 1;
  const std::uint32_t exp = (code >> man_bits) & ((1u << exp_bits) - 1);
  const std::uint32_t man = code & ((1u << man_bits) - 1);
  const std::uint32_t exp_max = (1u << exp_bits) - 1;
  std::uint32_t bits;
  if (has_inf && exp == exp_max) {
    bits = (sign << 31) | (0xFFu << 23) | (man ? 0x400000u : 0u);
  } else if (!has_inf && exp == exp_max && man == (1u << man_bits) - 1) {
    bits = (sign << 31) | (0xFFu << 23) | 0x400000u;
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign << 31;
    } else {  // subnormal: normalise the mantissa
      int e = 1 - bias;
      std::uint32_t m = man;
      while (!(m & (1u << man_bits))) {
        m <<= 1;
        --e;
      }
      m &= (1u << man_bits) - 1;
      bits = (sign << 31) | (static_cast<std::uint32_t>(e + 127) << 23) | (m << (23 - man_bits));
    }
  } else {
    bits = (sign << 31) | ((exp - bias + 127) << 23) | (man << (23 - man_bits));
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

bool same_float(float a, float b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

}  // namespace

TEST_CASE("every malformed safetensors file gives one clean InputError", "[safetensors]") {
  const auto cases = vdit_test::malformed_safetensors_cases();
  REQUIRE(cases.size() >= 20);
  const fs::path shipped = fs::path(VDIT_FIXTURES_DIR) / "malformed";
  const fs::path dir = temp_dir("malformed");
  for (const auto& c : cases) {
    INFO("case " << c.name);
    // The shipped corpus file is the generated one (regenerate with: vdit_tests "[.generate-corpus]").
    REQUIRE(fs::exists(shipped / (c.name + ".safetensors")));
    CHECK(read_file(shipped / (c.name + ".safetensors")) == c.bytes);
    const fs::path path = dir / (c.name + ".safetensors");
    write_file(path, c.bytes);
    for (int via = 0; via < 3; ++via) {
      std::string message;
      try {
        if (via == 0) SafetensorsFile::open(path.string());
        if (via == 1) SafetensorsFile::from_bytes(c.bytes, c.name);
        if (via == 2) WeightFile::open(path.string());
      } catch (const InputError& e) {
        message = e.what();
      }
      INFO("message: " << message);
      if (c.name == "empty" && via == 2) {  // WeightFile sees no magic and hands it to safetensors
        CHECK(message.find("shorter than") != std::string::npos);
        continue;
      }
      CHECK(message.find(c.expected_error) != std::string::npos);
      CHECK(message.find('\n') == std::string::npos);
    }
  }
  fs::remove_all(dir);
}

TEST_CASE("regenerate the shipped malformed corpus", "[.generate-corpus]") {
  const fs::path shipped = fs::path(VDIT_FIXTURES_DIR) / "malformed";
  fs::create_directories(shipped);
  for (const auto& c : vdit_test::malformed_safetensors_cases()) write_file(shipped / (c.name + ".safetensors"), c.bytes);
}

TEST_CASE("safetensors write then read is bit-exact for every dtype", "[safetensors]") {
  const fs::path dir = temp_dir("roundtrip");
  const fs::path path = dir / "all.safetensors";
  at::manual_seed(7);
  std::vector<WriteEntry> entries;
  entries.push_back({"f64", at::randn({3, 5}, at::kDouble), std::nullopt});
  entries.push_back({"f32", at::randn({2, 3, 4}), std::nullopt});
  entries.push_back({"f16", at::randn({7}).to(at::kHalf), std::nullopt});
  entries.push_back({"bf16", at::randn({4, 4}).to(at::kBFloat16), std::nullopt});
  entries.push_back({"i64", at::randint(-1000000, 1000000, {6}, at::kLong), std::nullopt});
  entries.push_back({"i32", at::randint(-100000, 100000, {6}, at::kInt), std::nullopt});
  entries.push_back({"i16", at::randint(-30000, 30000, {5}, at::kShort), std::nullopt});
  entries.push_back({"i8", at::randint(-128, 127, {9}, at::kChar), std::nullopt});
  entries.push_back({"u8", at::randint(0, 255, {9}, at::kByte), std::nullopt});
  entries.push_back({"bool", at::randint(0, 2, {11}, at::kByte).to(at::kBool), std::nullopt});
  entries.push_back({"empty", at::zeros({0, 3}), std::nullopt});
  entries.push_back({"scalar", at::full({}, 2.5), std::nullopt});
  at::Tensor fp8_codes = at::arange(256, at::kInt).to(at::kByte);
  entries.push_back({"e4m3", fp8_codes, StDType::F8_E4M3});
  entries.push_back({"e5m2", fp8_codes, StDType::F8_E5M2});
  write_safetensors(path.string(), entries, {{"prompt", "a red circle"}, {"seed", "42"}});

  auto file = SafetensorsFile::open(path.string());
  CHECK(file->metadata().at("prompt") == "a red circle");
  CHECK(file->entries().size() == entries.size());
  for (const auto& e : entries) {
    INFO("tensor " << e.name);
    const TensorEntry* entry = file->find(e.name);
    REQUIRE(entry != nullptr);
    if (e.stored_as) {
      CHECK(entry->dtype == *e.stored_as);
      CHECK(std::memcmp(file->raw_bytes(*entry), e.tensor.data_ptr(), 256) == 0);
      continue;
    }
    at::Tensor back = file->tensor(e.name);
    CHECK(back.scalar_type() == e.tensor.scalar_type());
    CHECK(back.sizes() == e.tensor.sizes());
    if (e.tensor.numel() > 0)  // an empty tensor has no data pointer to compare
      CHECK(std::memcmp(back.data_ptr(), e.tensor.contiguous().data_ptr(), e.tensor.numel() * e.tensor.element_size()) == 0);
  }
  // Refuses to overwrite unless asked; the existing file is untouched.
  const std::string before = read_file(path);
  CHECK_THROWS_AS(write_safetensors(path.string(), entries, {}, /*overwrite=*/false), InputError);
  CHECK(read_file(path) == before);
  // No temporary files left behind.
  int files = 0;
  for (const auto& p : fs::directory_iterator(dir)) files += p.is_regular_file();
  CHECK(files == 1);
  fs::remove_all(dir);
}

TEST_CASE("fp8 codes decode exactly over all 256 values", "[safetensors]") {
  at::Tensor codes = at::arange(256, at::kInt).to(at::kByte);
  auto bytes_e4m3 = [&] {
    const fs::path dir = temp_dir("fp8");
    const fs::path path = dir / "fp8.safetensors";
    write_safetensors(path.string(), {{"w4", codes, StDType::F8_E4M3}, {"w5", codes, StDType::F8_E5M2}});
    auto f = SafetensorsFile::open(path.string());
    auto pair = std::make_pair(f->tensor("w4").clone(), f->tensor("w5").clone());
    fs::remove_all(dir);
    return pair;
  }();
  at::Tensor e4m3 = bytes_e4m3.first, e5m2 = bytes_e4m3.second;
  REQUIRE(e4m3.scalar_type() == at::kFloat);
  for (int b = 0; b < 256; ++b) {
    INFO("code " << b);
    CHECK(same_float(e4m3[b].item<float>(), fp8_by_bits(static_cast<std::uint8_t>(b), 4, 3, 7, false)));
    CHECK(same_float(e5m2[b].item<float>(), fp8_by_bits(static_cast<std::uint8_t>(b), 5, 2, 15, true)));
  }
  // Anchors from the format definitions.
  CHECK(e4m3[0x7E].item<float>() == 448.0f);        // largest finite E4M3
  CHECK(e4m3[0x01].item<float>() == std::ldexp(1.0f, -9));
  CHECK(e4m3[0x38].item<float>() == 1.0f);
  CHECK(std::isnan(e4m3[0x7F].item<float>()));
  CHECK(e5m2[0x7B].item<float>() == 57344.0f);      // largest finite E5M2
  CHECK(std::isinf(e5m2[0x7C].item<float>()));
  CHECK(e5m2[0x01].item<float>() == std::ldexp(1.0f, -16));
  CHECK(e5m2[0x3C].item<float>() == 1.0f);
}

TEST_CASE("sharded checkpoints load through their index", "[safetensors]") {
  const fs::path dir = temp_dir("sharded");
  at::Tensor a = at::randn({3, 4}), b = at::randn({5});
  write_safetensors((dir / "model-00001-of-00002.safetensors").string(), {{"a", a, std::nullopt}});
  write_safetensors((dir / "model-00002-of-00002.safetensors").string(), {{"b", b, std::nullopt}});
  write_file(dir / "model.safetensors.index.json",
             R"({"metadata":{"total_size":68},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}})");
  auto wf = WeightFile::open((dir / "model.safetensors.index.json").string());
  CHECK(wf->format() == "safetensors-sharded");
  CHECK(wf->keys().size() == 2);
  CHECK(at::equal(wf->load("a"), a));
  CHECK(at::equal(wf->load("b"), b));
  CHECK(wf->parameter_count() == 17);
  write_file(dir / "bad.index.json", R"({"weight_map":{"a":"missing.safetensors"}})");
  CHECK_THROWS_AS(WeightFile::open((dir / "bad.index.json").string()), InputError);
  fs::remove_all(dir);
}

TEST_CASE("torch zip checkpoints (.pth) load and equal their safetensors twins", "[safetensors]") {
  const std::string base = std::string(VDIT_FIXTURES_DIR) + "/wan-tiny/";
  auto pth = WeightFile::open(base + "t5/weights_bf16.pth");
  auto st = WeightFile::open(base + "t5/weights_bf16.safetensors");
  CHECK(pth->format() == "pth");
  REQUIRE(pth->keys().size() == st->keys().size());
  for (const auto& key : st->keys()) {
    INFO(key);
    REQUIRE(pth->has(key));
    CHECK(pth->meta(key).dtype == "BF16");
    CHECK(at::equal(pth->load(key), st->load(key)));
  }
  // A truncated zip is a clean error.
  const fs::path dir = temp_dir("pth");
  std::string bytes = read_file(base + "t5/weights_bf16.pth");
  write_file(dir / "cut.pth", bytes.substr(0, bytes.size() / 2));
  CHECK_THROWS_AS(WeightFile::open((dir / "cut.pth").string()), InputError);
  CHECK_THROWS_AS(WeightFile::open((dir / "nope.pth").string()), InputError);
  CHECK_THROWS_AS(WeightFile::open(dir.string()), InputError);
  fs::remove_all(dir);
}
