// JSON config files for the CLI (`--config FILE.json`): top-level keys are global or subcommand
// options; a nested object holds the options of the subcommand it is named after.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <sstream>
#include <string>
#include <vector>

namespace vdit::cli {

class JsonConfig : public CLI::Config {
 public:
  std::string to_config(const CLI::App* app, bool default_also, bool, std::string) const override {
    nlohmann::json j = nlohmann::json::object();
    for (const CLI::Option* opt : app->get_options({})) {
      if (opt->get_lnames().empty() || !opt->get_configurable()) continue;
      const std::string name = opt->get_lnames()[0];
      if (opt->count() > 0) {
        j[name] = opt->results().size() == 1 ? nlohmann::json(opt->results()[0]) : nlohmann::json(opt->results());
      } else if (default_also && !opt->get_default_str().empty()) {
        j[name] = opt->get_default_str();
      }
    }
    return j.dump(2) + "\n";
  }

  std::vector<CLI::ConfigItem> from_config(std::istream& input) const override {
    nlohmann::json j = nlohmann::json::parse(input, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) throw CLI::ConversionError("config file is not a JSON object");
    std::vector<CLI::ConfigItem> items;
    collect(j, {}, items);
    return items;
  }

 private:
  static std::string scalar(const nlohmann::json& v) {
    if (v.is_string()) return v.get<std::string>();
    if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
    return v.dump();
  }
  // A config nests at most a command and a subcommand deep; deeper nesting is refused rather than
  // followed, so a hostile file cannot recurse the stack away.
  static constexpr std::size_t kMaxSectionDepth = 8;
  static void collect(const nlohmann::json& j, const std::vector<std::string>& parents, std::vector<CLI::ConfigItem>& items) {
    if (parents.size() > kMaxSectionDepth)
      throw CLI::ConversionError("config file nests sections more than " + std::to_string(kMaxSectionDepth) + " deep");
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (it.value().is_object()) {
        auto p = parents;
        p.push_back(it.key());
        collect(it.value(), p, items);
        continue;
      }
      CLI::ConfigItem item;
      item.parents = parents;
      item.name = it.key();
      if (it.value().is_array()) {
        for (const auto& v : it.value()) item.inputs.push_back(scalar(v));
      } else {
        item.inputs.push_back(scalar(it.value()));
      }
      items.push_back(std::move(item));
    }
  }
};

}  // namespace vdit::cli
