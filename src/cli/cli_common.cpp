#include "cli_common.h"

#include "vdit/common.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

namespace vdit::cli {

namespace fs = std::filesystem;

std::pair<std::int64_t, std::int64_t> parse_size(const std::string& text) {
  const auto x = text.find_first_of("xX*");
  try {
    if (x == std::string::npos) throw std::invalid_argument("no x");
    std::size_t used_w = 0, used_h = 0;
    const std::string ws = text.substr(0, x), hs = text.substr(x + 1);
    const long long w = std::stoll(ws, &used_w), h = std::stoll(hs, &used_h);
    if (used_w != ws.size() || used_h != hs.size()) throw std::invalid_argument("junk");
    return {w, h};
  } catch (const std::exception&) {
    throw InputError("--size '" + text + "' is not WIDTHxHEIGHT (e.g. 832x480)");
  }
}

std::string builtin_model_dir() {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  for (const fs::path& candidate : {exe.parent_path().parent_path() / "share" / "vdit" / "models" / "shapes",
                                    fs::path(VDIT_SOURCE_DIR) / "models" / "shapes"}) {
    if (fs::exists(candidate / "model_index.json", ec)) return candidate.string();
  }
  return "";
}

std::optional<ModelDefaults> read_model_defaults(const std::string& dir) {
  const fs::path path = fs::path(dir) / "vdit-demo.json";
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return std::nullopt;
  ModelDefaults d;
  try {
    std::ifstream in(path);
    const nlohmann::json j = nlohmann::json::parse(in);
    if (!j.is_object()) throw InputError(path.string() + ": not a JSON object");
    for (const auto& [key, value] : j.items()) {
      if (key == "size") d.size = value.get<std::string>();
      else if (key == "frames") d.frames = value.get<std::int64_t>();
      else if (key == "steps") d.steps = value.get<int>();
      else if (key == "sampler") d.sampler = value.get<std::string>();
      else if (key == "eta") d.eta = value.get<double>();
      else if (key == "shift") d.shift = value.get<double>();
      else if (key == "guidance") d.guidance = value.get<double>();
      else if (key == "fps") d.fps = value.get<double>();
      else if (key == "negative_prompt") d.negative_prompt = value.get<std::string>();
      else if (key == "autoguidance") d.autoguidance = value.get<double>();
      else if (key == "guide_dit") d.guide_dit = (fs::path(dir) / value.get<std::string>()).string();
      else if (key.empty() || key[0] != '_') log_warning(path.string() + ": unknown key '" + key + "' ignored");
    }
  } catch (const nlohmann::json::exception& e) {
    throw InputError(path.string() + ": " + e.what());
  }
  return d;
}

}  // namespace vdit::cli
