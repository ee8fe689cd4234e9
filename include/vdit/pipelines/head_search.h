// HeadHunter's greedy head search (Alg. 1 of "HeadHunter: ..." ; ALGORITHMS.md §3.3): each round
// scores every (layer, head) not yet chosen, added to the chosen set, by an objective (the mean of
// a score over fixed prompt-seed pairs), and adds the round's top k to the set. The objective is
// a callback, so the search runs on the demo judge, a user's scoring program, or a test's
// synthetic function alike. The state is saved after every scored head; a resumed search skips
// what was scored and gives the same ranking as an uninterrupted one (the objective being
// deterministic).
#pragma once

#include "vdit/pipelines/perturbed_guidance.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace vdit {

struct HeadScore {
  int layer = 0, head = 0;
  double score = 0;
  int round = 0;
};

struct HeadSearchConfig {
  std::int64_t num_layers = 0, num_heads = 0;
  int top_k = 3;
  int rounds = 1;
  // Saved with the state and compared on resume: a state of another search is refused.
  nlohmann::json fingerprint = nlohmann::json::object();
};

struct HeadSearchState {
  HeadSet chosen;                  // the heads kept so far
  int round = 0;                   // the round being scored (== rounds when done)
  std::vector<HeadScore> scored;   // every head scored, all rounds, in scoring order
  std::optional<double> baseline;  // the objective of the chosen set before round 0 (the empty set)
  nlohmann::json to_json(const HeadSearchConfig& config) const;
  static HeadSearchState from_json(const nlohmann::json& j, const HeadSearchConfig& config, const std::string& label);
};

// Scores a head set (higher is better).
using HeadSetObjective = std::function<double(const HeadSet&)>;
// After each scored head: (heads scored so far in the whole search, total to score, last score).
using HeadSearchProgress = std::function<void(std::int64_t, std::int64_t, const HeadScore&)>;

// Heads scored in a whole search: sum over rounds of the pool size (pool shrinks by k per round).
std::int64_t head_search_total(const HeadSearchConfig& config);

// Runs (or continues, from `state`) the search; `save` is called with the state after every
// scored head and at every round's end. Returns the final state.
HeadSearchState head_search(const HeadSearchConfig& config, const HeadSetObjective& objective, HeadSearchState state = {},
                            const std::function<void(const HeadSearchState&)>& save = {},
                            const HeadSearchProgress& progress = {});

// The scores of one round, best first (ties: lower layer, then lower head).
std::vector<HeadScore> round_ranking(const HeadSearchState& state, int round);

// Writes JSON atomically (temporary file, then rename).
void write_json_atomically(const std::string& path, const nlohmann::json& j);

}  // namespace vdit
