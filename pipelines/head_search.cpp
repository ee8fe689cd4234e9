// HeadHunter's greedy head search: see include/vdit/pipelines/head_search.h.
#include "vdit/pipelines/head_search.h"

#include "vdit/common.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

namespace vdit {

namespace {

bool chosen_contains(const HeadSet& chosen, int layer, int head) {
  auto it = chosen.find(layer);
  return it != chosen.end() && std::binary_search(it->second.begin(), it->second.end(), head);
}

}  // namespace

nlohmann::json HeadSearchState::to_json(const HeadSearchConfig& config) const {
  nlohmann::json scores = nlohmann::json::array();
  for (const auto& s : scored) scores.push_back({{"layer", s.layer}, {"head", s.head}, {"score", s.score}, {"round", s.round}});
  nlohmann::json j = {{"chosen", head_set_json(chosen)},
                      {"round", round},
                      {"scored", scores},
                      {"search", config.fingerprint},
                      {"num_layers", config.num_layers},
                      {"num_heads", config.num_heads},
                      {"top_k", config.top_k},
                      {"rounds", config.rounds}};
  if (baseline) j["baseline"] = *baseline;
  return j;
}

HeadSearchState HeadSearchState::from_json(const nlohmann::json& j, const HeadSearchConfig& config, const std::string& label) {
  try {
    if (j.at("search") != config.fingerprint || j.at("num_layers").get<std::int64_t>() != config.num_layers ||
        j.at("num_heads").get<std::int64_t>() != config.num_heads || j.at("top_k").get<int>() != config.top_k ||
        j.at("rounds").get<int>() != config.rounds)
      throw InputError(label + ": the saved search has other settings (model, objective, pairs, k, rounds, u, scale or "
                               "steps); start a new one or give the same options");
    HeadSearchState s;
    s.chosen = head_set_from_json(j.at("chosen"), label);
    s.round = j.at("round").get<int>();
    for (const auto& e : j.at("scored"))
      s.scored.push_back({e.at("layer").get<int>(), e.at("head").get<int>(), e.at("score").get<double>(), e.at("round").get<int>()});
    if (j.contains("baseline")) s.baseline = j.at("baseline").get<double>();
    return s;
  } catch (const nlohmann::json::exception& e) {
    throw InputError(label + ": not a head search state (" + std::string(e.what()) + ")");
  }
}

std::int64_t head_search_total(const HeadSearchConfig& c) {
  std::int64_t pool = c.num_layers * c.num_heads, total = 0;
  for (int r = 0; r < c.rounds && pool > 0; ++r) {
    total += pool;
    pool -= std::min<std::int64_t>(c.top_k, pool);
  }
  return total;
}

std::vector<HeadScore> round_ranking(const HeadSearchState& state, int round) {
  std::vector<HeadScore> out;
  for (const auto& s : state.scored)
    if (s.round == round) out.push_back(s);
  std::stable_sort(out.begin(), out.end(), [](const HeadScore& a, const HeadScore& b) {
    if (a.score != b.score) return a.score > b.score;
    if (a.layer != b.layer) return a.layer < b.layer;
    return a.head < b.head;
  });
  return out;
}

HeadSearchState head_search(const HeadSearchConfig& config, const HeadSetObjective& objective, HeadSearchState state,
                            const std::function<void(const HeadSearchState&)>& save, const HeadSearchProgress& progress) {
  if (config.num_layers < 1 || config.num_heads < 1) throw InputError("head search: the model has no heads");
  if (config.top_k < 1) throw InputError("--top-k must be at least 1");
  if (config.rounds < 1) throw InputError("--rounds must be at least 1");
  const std::int64_t total = head_search_total(config);
  if (!state.baseline) {
    state.baseline = objective(state.chosen);
    if (save) save(state);
  }
  while (state.round < config.rounds) {
    std::set<std::pair<int, int>> done;
    for (const auto& s : state.scored)
      if (s.round == state.round) done.insert({s.layer, s.head});
    std::int64_t pool = 0;
    for (int layer = 0; layer < config.num_layers; ++layer)
      for (int head = 0; head < config.num_heads; ++head) {
        if (chosen_contains(state.chosen, layer, head)) continue;
        ++pool;
        if (done.count({layer, head})) continue;
        HeadSet candidate = state.chosen;
        add_head(candidate, layer, head);
        HeadScore score{layer, head, objective(candidate), state.round};
        state.scored.push_back(score);
        if (save) save(state);
        if (progress) progress(static_cast<std::int64_t>(state.scored.size()), total, score);
      }
    if (pool == 0) {
      state.round = config.rounds;
      break;
    }
    const auto ranking = round_ranking(state, state.round);
    for (std::size_t i = 0; i < ranking.size() && i < static_cast<std::size_t>(config.top_k); ++i)
      add_head(state.chosen, ranking[i].layer, ranking[i].head);
    ++state.round;
    if (save) save(state);
  }
  return state;
}

void write_json_atomically(const std::string& path, const nlohmann::json& j) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw InputError(path + ": cannot write");
    out << j.dump(1) << "\n";
    if (!out) throw InputError(path + ": cannot write");
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) throw InputError(path + ": cannot write (" + ec.message() + ")");
}

}  // namespace vdit
