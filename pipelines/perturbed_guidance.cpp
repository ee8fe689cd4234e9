// Head sets and the checks of the perturbed guidance terms: see
// include/vdit/pipelines/perturbed_guidance.h.
#include "vdit/pipelines/perturbed_guidance.h"

#include "vdit/common.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <iterator>
#include <sstream>

namespace vdit {

namespace {

std::string trim(const std::string& s) {
  std::size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(s);
  while (std::getline(in, part, sep)) parts.push_back(part);
  if (!s.empty() && s.back() == sep) parts.emplace_back();
  return parts;
}

int parse_index(const std::string& text, const std::string& what, const std::string& spec) {
  const std::string t = trim(text);
  if (t.empty() || t.size() > 6 || !std::all_of(t.begin(), t.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }))
    throw InputError("head set '" + spec + "': " + what + " '" + t + "' is not a non-negative integer (write layer:head,head;layer:head)");
  return std::stoi(t);
}

std::string fraction_text(double v) {
  std::ostringstream out;
  out << v;
  return out.str();
}

void check_range(double start, double end, const std::string& option) {
  if (!(std::isfinite(start) && std::isfinite(end) && start >= 0.0 && end <= 1.0 && start < end))
    throw InputError(option + " " + fraction_text(start) + ":" + fraction_text(end) +
                     " must be fractions of the steps with 0 <= a < b <= 1");
}

}  // namespace

void add_head(HeadSet& heads, int layer, int head) {
  auto& list = heads[layer];
  auto it = std::lower_bound(list.begin(), list.end(), head);
  if (it == list.end() || *it != head) list.insert(it, head);
}

HeadSet parse_head_spec(const std::string& spec, std::int64_t num_heads) {
  HeadSet heads;
  if (trim(spec).empty()) throw InputError("head set is empty (write layer:head,head;layer:head)");
  for (const std::string& group : split(spec, ';')) {
    if (trim(group).empty()) continue;
    const auto colon = group.find(':');
    if (colon == std::string::npos)
      throw InputError("head set '" + spec + "': '" + trim(group) + "' has no ':' (write layer:head,head;layer:head)");
    const int layer = parse_index(group.substr(0, colon), "layer", spec);
    const std::string list = trim(group.substr(colon + 1));
    if (list == "*") {
      if (num_heads <= 0) throw InputError("head set '" + spec + "': '*' needs the model's head count");
      for (int h = 0; h < num_heads; ++h) add_head(heads, layer, h);
      continue;
    }
    if (list.empty()) throw InputError("head set '" + spec + "': layer " + std::to_string(layer) + " lists no head");
    for (const std::string& h : split(list, ',')) add_head(heads, layer, parse_index(h, "head", spec));
  }
  if (heads.empty()) throw InputError("head set '" + spec + "' names no head");
  return heads;
}

std::string head_set_text(const HeadSet& heads) {
  std::string out;
  for (const auto& [layer, list] : heads) {
    if (list.empty()) continue;
    if (!out.empty()) out += ';';
    out += std::to_string(layer) + ':';
    for (std::size_t i = 0; i < list.size(); ++i) out += (i ? "," : "") + std::to_string(list[i]);
  }
  return out;
}

std::size_t head_count(const HeadSet& heads) {
  std::size_t n = 0;
  for (const auto& [layer, list] : heads) n += list.size();
  return n;
}

HeadSet layer_heads(const std::vector<int>& layers, std::int64_t num_heads) {
  HeadSet heads;
  for (int layer : layers)
    for (int h = 0; h < num_heads; ++h) add_head(heads, layer, h);
  return heads;
}

nlohmann::json head_set_json(const HeadSet& heads) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [layer, list] : heads)
    if (!list.empty()) j[std::to_string(layer)] = list;
  return j;
}

HeadSet head_set_from_json(const nlohmann::json& j, const std::string& label) {
  if (!j.is_object()) throw InputError(label + ": \"heads\" must be an object {\"layer\": [head, ...]}");
  HeadSet heads;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const int layer = parse_index(it.key(), "layer", label);
    if (!it.value().is_array()) throw InputError(label + ": heads of layer " + it.key() + " must be a list of integers");
    for (const auto& h : it.value()) {
      if (!h.is_number_integer() || h.get<std::int64_t>() < 0 || h.get<std::int64_t>() > 999999)
        throw InputError(label + ": heads of layer " + it.key() + " must be non-negative integers");
      add_head(heads, layer, static_cast<int>(h.get<std::int64_t>()));
    }
  }
  return heads;
}

HeadSetFile read_head_set_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path + ": cannot read the head set file");
  std::ostringstream text;
  text << in.rdbuf();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text.str());
  } catch (const nlohmann::json::exception& e) {
    std::string what = e.what();
    for (char& c : what)
      if (c == '\n') c = ' ';
    throw InputError(path + ": not valid JSON (" + what + ")");
  }
  if (!j.is_object() || !j.contains("heads")) throw InputError(path + ": expected {\"heads\": {\"layer\": [head, ...]}, ...}");
  HeadSetFile file;
  file.heads = head_set_from_json(j.at("heads"), path);
  const auto number = [&](const char* key) -> std::optional<double> {
    if (!j.contains(key) || j.at(key).is_null()) return std::nullopt;
    if (!j.at(key).is_number()) throw InputError(path + ": \"" + key + "\" must be a number");
    return j.at(key).get<double>();
  };
  file.soft_pag = number("soft_pag");
  file.pag_scale = number("pag_scale");
  return file;
}

void check_head_set(const HeadSet& heads, std::int64_t num_layers, std::int64_t num_heads, const std::string& option) {
  for (const auto& [layer, list] : heads) {
    if (layer < 0 || layer >= num_layers)
      throw InputError(option + ": layer " + std::to_string(layer) + " is out of range; the model has layers 0.." +
                       std::to_string(num_layers - 1));
    for (int h : list)
      if (h < 0 || h >= num_heads)
        throw InputError(option + ": head " + std::to_string(h) + " of layer " + std::to_string(layer) +
                         " is out of range; the model has heads 0.." + std::to_string(num_heads - 1));
  }
}

std::shared_ptr<HeadPerturbation> make_head_perturbation(const HeadSet& heads, double u) {
  std::map<HeadPerturbation::HeadKey, double> weights;
  for (const auto& [layer, list] : heads)
    for (int h : list) weights[{layer, h}] = u;
  return std::make_shared<HeadPerturbation>(std::move(weights), std::vector<RowRole>{RowRole::Perturbed});
}

void add_head_perturbation(AttentionProcessors& processors, const HeadSet& heads, double u) {
  auto processor = make_head_perturbation(heads, u);
  for (const auto& [layer, list] : heads)
    if (!list.empty()) processors.set(layer, AttentionKind::Self, processor);
}

bool pag_enabled(const T2VSettings& s) {
  return s.pag_scale != 0.0 && (head_count(s.pag_heads) > 0 || !s.pag_layers.empty());
}

HeadSet pag_head_set(const T2VSettings& s, std::int64_t num_heads) {
  HeadSet heads = s.pag_heads;
  for (const auto& [layer, list] : layer_heads(s.pag_layers, num_heads))
    for (int h : list) add_head(heads, layer, h);
  for (auto it = heads.begin(); it != heads.end();) it = it->second.empty() ? heads.erase(it) : std::next(it);
  return heads;
}
bool slg_enabled(const T2VSettings& s) { return s.slg_scale != 0.0 && !s.slg_layers.empty(); }

void check_guidance_terms(const T2VSettings& s) {
  if (!std::isfinite(s.pag_scale)) throw InputError("--pag-scale must be a finite number");
  if (!(s.soft_pag >= 0.0 && s.soft_pag <= 1.0))
    throw InputError("--soft-pag must be in [0, 1] (got " + fraction_text(s.soft_pag) + ")");
  check_range(s.pag_start, s.pag_end, "--pag-steps");
  if (!std::isfinite(s.slg_scale)) throw InputError("--slg-scale must be a finite number");
  check_range(s.slg_start, s.slg_end, "--slg-steps");
  for (int layer : s.slg_layers)
    if (layer < 0) throw InputError("--slg-layers: layer " + std::to_string(layer) + " is negative");
  if (s.cfg_zero_star && s.guidance == 1.0) throw InputError("--cfg-zero-star needs classifier-free guidance (--guidance other than 1)");
  if (s.cfg_zero_init_steps < -1) throw InputError("--cfg-zero-init must be -1 (4 % of the steps) or more");
}

void check_guidance_terms(const T2VSettings& s, const WanDiTConfig& config) {
  check_guidance_terms(s);
  check_head_set(s.pag_heads, config.num_layers, config.num_heads, "--pag-heads");
  for (int layer : s.pag_layers)
    if (layer < 0 || layer >= config.num_layers)
      throw InputError("--pag-layers: layer " + std::to_string(layer) + " is out of range; the model has layers 0.." +
                       std::to_string(config.num_layers - 1));
  for (int layer : s.slg_layers)
    if (layer >= config.num_layers)
      throw InputError("--slg-layers: layer " + std::to_string(layer) + " is out of range; the model has layers 0.." +
                       std::to_string(config.num_layers - 1));
}

}  // namespace vdit
