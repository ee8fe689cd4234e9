// Head sets for perturbed-attention guidance (PAG, SoftPAG, HeadHunter): how they are written on
// the command line and in files, checked against a model, and turned into the attention
// processor of the perturbed pass; and the checks of the PAG / SLG / CFG-Zero* settings.
#pragma once

#include "vdit/attention/processors.h"
#include "vdit/pipelines/wan_t2v.h"

#include <nlohmann/json_fwd.hpp>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace vdit {

// layer -> global head indices (sorted, unique).
using HeadSet = std::map<int, std::vector<int>>;

// "layer:head,head;layer:head" (spaces allowed; "3:*" means every head of layer 3 and needs
// `num_heads` > 0). InputError (one line) for anything else.
HeadSet parse_head_spec(const std::string& spec, std::int64_t num_heads = 0);
// The same text, written back ("3:0,2;5:1"); "" for the empty set.
std::string head_set_text(const HeadSet& heads);
std::size_t head_count(const HeadSet& heads);
// Every head of each of `layers`.
HeadSet layer_heads(const std::vector<int>& layers, std::int64_t num_heads);
// Adds (layer, head), keeping the set sorted and unique.
void add_head(HeadSet& heads, int layer, int head);

// A head-set file as the search writes it: {"heads": {"3": [0, 2]}, "soft_pag": 0.5,
// "pag_scale": 2, ...}; other keys (the search's ranking) are ignored.
struct HeadSetFile {
  HeadSet heads;
  std::optional<double> soft_pag, pag_scale;
};
HeadSetFile read_head_set_file(const std::string& path);  // InputError: unreadable, bad JSON, bad values
nlohmann::json head_set_json(const HeadSet& heads);        // {"3": [0, 2]}
HeadSet head_set_from_json(const nlohmann::json& j, const std::string& label);

// InputError if a layer or head is outside the model (0..layers-1, 0..heads-1).
void check_head_set(const HeadSet& heads, std::int64_t num_layers, std::int64_t num_heads, const std::string& option);

// SoftPAG with weight u on every head of `heads`, acting on RowRole::Perturbed rows only,
// registered on the self-attention of each layer of the set.
std::shared_ptr<HeadPerturbation> make_head_perturbation(const HeadSet& heads, double u);
void add_head_perturbation(AttentionProcessors& processors, const HeadSet& heads, double u);

// Whether a run has a perturbed (PAG) pass / a skip-layer pass.
bool pag_enabled(const T2VSettings& settings);
bool slg_enabled(const T2VSettings& settings);
// The heads the perturbed pass perturbs: pag_heads and every head of pag_layers.
HeadSet pag_head_set(const T2VSettings& settings, std::int64_t num_heads);

// The checks that need no model: u in [0, 1], finite scales, step ranges 0 <= a < b <= 1,
// CFG-Zero* only with CFG. InputError.
void check_guidance_terms(const T2VSettings& settings);
// The checks against the DiT: head and SLG layer indices in range.
void check_guidance_terms(const T2VSettings& settings, const WanDiTConfig& config);

}  // namespace vdit
