#include "cli_common.h"

#include "vdit/common.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

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

std::string nearest_name(const std::string& name, const std::vector<std::string>& known) {
  std::string best;
  std::size_t best_distance = std::string::npos;
  for (const std::string& candidate : known) {
    // Levenshtein distance, one row at a time.
    std::vector<std::size_t> row(candidate.size() + 1);
    for (std::size_t j = 0; j <= candidate.size(); ++j) row[j] = j;
    for (std::size_t i = 1; i <= name.size(); ++i) {
      std::size_t diagonal = row[0];
      row[0] = i;
      for (std::size_t j = 1; j <= candidate.size(); ++j) {
        const std::size_t up = row[j];
        row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (name[i - 1] == candidate[j - 1] ? 0 : 1)});
        diagonal = up;
      }
    }
    if (row.back() < best_distance) {
      best_distance = row.back();
      best = candidate;
    }
  }
  return best_distance <= std::max<std::size_t>(1, name.size() / 3) ? best : std::string();
}

std::optional<ModelDefaults> read_model_defaults(const std::string& dir) {
  const fs::path path = fs::path(dir) / "vdit-demo.json";
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return std::nullopt;
  ModelDefaults d;
  nlohmann::json j;
  {
    std::ifstream in(path);
    j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  }
  if (j.is_discarded()) throw InputError(path.string() + ": not valid JSON");
  if (!j.is_object()) throw InputError(path.string() + ": not a JSON object");
  static const std::vector<std::string> known{"size", "frames", "steps", "sampler", "eta", "shift", "guidance", "fps",
                                              "negative_prompt", "autoguidance", "guide_dit", "trained_frames"};
  for (const auto& [key, value] : j.items()) {
    // A value of the wrong type names its key and what it should be.
    const auto need = [&, &key = key, &value = value](bool ok, const char* what) {
      if (!ok) throw InputError(path.string() + ": key '" + key + "' must be " + what + " (got " + value.dump() + ")");
    };
    const auto integer = [&](const char* what) {
      need(value.is_number_integer() || (value.is_number_float() && std::floor(value.get<double>()) == value.get<double>()),
           what);
      return value.get<std::int64_t>();
    };
    if (key == "size") {
      need(value.is_string(), "a string such as \"64x64\"");
      d.size = value.get<std::string>();
    } else if (key == "frames") {
      d.frames = integer("an integer");
    } else if (key == "trained_frames") {
      d.trained_frames = integer("an integer");
      need(*d.trained_frames >= 1, "a positive frame count");
    } else if (key == "steps") {
      const std::int64_t steps = integer("an integer");
      need(steps >= 0 && steps <= std::numeric_limits<int>::max(), "a step count");
      d.steps = static_cast<int>(steps);
    } else if (key == "sampler") {
      need(value.is_string(), "a string (unipc, dpm++, euler or euler-a)");
      d.sampler = value.get<std::string>();
    } else if (key == "negative_prompt") {
      need(value.is_string(), "a string");
      d.negative_prompt = value.get<std::string>();
    } else if (key == "guide_dit") {
      need(value.is_string(), "a path (a string)");
      d.guide_dit = (fs::path(dir) / value.get<std::string>()).string();
    } else if (key == "eta" || key == "shift" || key == "guidance" || key == "fps" || key == "autoguidance") {
      need(value.is_number(), "a number");
      const double v = value.get<double>();
      if (key == "eta") d.eta = v;
      else if (key == "shift") d.shift = v;
      else if (key == "guidance") d.guidance = v;
      else if (key == "fps") d.fps = v;
      else d.autoguidance = v;
    } else if (key.empty() || key[0] != '_') {
      const std::string nearest = nearest_name(key, known);
      log_warning(path.string() + ": unknown key '" + key + "' ignored" +
                  (nearest.empty() ? std::string() : " (did you mean '" + nearest + "'?)"));
    }
  }
  return d;
}

}  // namespace vdit::cli
