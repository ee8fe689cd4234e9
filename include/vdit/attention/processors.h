// Attention processors: SoftPAG head perturbation, cross-attention map capture, prompt-to-prompt
// style edits, a cross-attention output cache (FreeSwim), and a chain that composes them. Each
// acts on the batch rows of the roles it is given (AttentionSite::rows; no roles: every row) and
// passes everything else straight to `inner`, so a processor changes nothing outside its layers
// and rows.
#pragma once

#include "vdit/attention/attention.h"

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <utility>
#include <vector>

namespace vdit {

// Runs processors in order: the first is outermost (sees the inputs first and the output last);
// the last one's `inner` is the plain kernel (or the chain's own inner when chains nest).
class ProcessorChain : public AttentionProcessor {
 public:
  ProcessorChain() = default;
  explicit ProcessorChain(std::vector<std::shared_ptr<AttentionProcessor>> processors);
  ProcessorChain& add(std::shared_ptr<AttentionProcessor> processor);
  const std::vector<std::shared_ptr<AttentionProcessor>>& processors() const { return processors_; }
  at::Tensor process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call, const AttentionFn& inner) override;

 private:
  std::vector<std::shared_ptr<AttentionProcessor>> processors_;
};

// SoftPAG (HeadHunter eq. 7) on chosen heads: out_h = (1 − u)·attention_h + u·V_h, i.e. the map
// interpolated towards the identity without forming it. u = 1 is PAG (the head returns V), u = 0
// leaves the head as is; heads and rows not selected are returned bitwise unchanged. Heads are
// global indices (site.head_offset maps them onto a call that holds a slice of the heads).
// Applies to self-attention, on the rows of `roles` (empty: every row).
class HeadPerturbation : public AttentionProcessor {
 public:
  using HeadKey = std::pair<int, int>;  // (layer, global head)
  explicit HeadPerturbation(std::map<HeadKey, double> weights = {}, std::vector<RowRole> roles = {});
  void set_weight(int layer, int head, double u);  // u in [0, 1]; 0 removes the head
  const std::map<HeadKey, double>& weights() const { return weights_; }
  void set_roles(std::vector<RowRole> roles) { roles_ = std::move(roles); }
  void set_enabled(bool enabled) { enabled_ = enabled; }
  at::Tensor process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call, const AttentionFn& inner) override;

 private:
  std::map<HeadKey, double> weights_;
  std::vector<RowRole> roles_;
  bool enabled_ = true;
};

// Captures cross-attention probability maps per text token, summed over heads and over every
// captured call (layers, steps), into [R, text_tokens, Tp, Hp, Wp] (R: the captured rows) where (Tp, Hp, Wp) is the
// query grid pooled by `pool` (ceil division; a partial cell averages what it holds). The
// probabilities are recomputed from q and k one query block at a time, so no [Nq, Nk] map of a
// whole call is kept; the output of the call is the untouched inner result.
class CrossAttentionMapCapture : public AttentionProcessor {
 public:
  struct Options {
    std::set<int> layers;                 // empty: every layer
    std::vector<RowRole> roles;           // rows captured; empty: every row
    std::array<std::int64_t, 3> pool{1, 1, 1};
    std::int64_t query_block = 4096;      // rows of one probability block
  };
  CrossAttentionMapCapture() : CrossAttentionMapCapture(Options{}) {}
  explicit CrossAttentionMapCapture(Options options);
  at::Tensor process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call, const AttentionFn& inner) override;
  // Mean map: the sum divided by heads × calls × cell size, so each cell sums to 1 over the text
  // tokens (over the valid ones when keys were masked). Undefined before any capture.
  at::Tensor maps() const;
  const at::Tensor& sums() const { return sums_; }   // raw sums, f32
  std::int64_t captured_calls() const { return calls_; }
  void clear();
  void set_enabled(bool enabled) { enabled_ = enabled; }

 private:
  Options options_;
  at::Tensor sums_;        // [R, text, Tp, Hp, Wp]
  at::Tensor cell_sizes_;  // [Tp, Hp, Wp] queries per cell
  std::int64_t heads_ = 0, calls_ = 0;
  bool enabled_ = true;
};

// Prompt-to-prompt edits without forming maps (ALGORITHMS.md §4.1, "For Wan"). With A_src, A_tgt
// the source/target cross-attention maps, mapper M [text_src, text_tgt], per-target-token alpha
// and reweight c, the edited output is
//   out = A_src · (M · (α ⊙ c ⊙ V)) + A_tgt · ((1 − α) ⊙ c ⊙ V),
// i.e. A* = α·(A_src M) + (1 − α)·A_tgt, then column k scaled by c_k (no renormalisation), times V.
// Both terms are ordinary attention calls. Without a source (or α = 0) it is a pure reweight.
// Self-attention injection (optional): targets use the source's q, k with their own v
// (= replacing the self-attention map by the source's).
// Source: a row of the same call (Source::Batch: the row labelled RowRole::Source, whose output is
// returned as computed, edits the rows labelled RowRole::Target; unlabelled rows: row 0 is the
// source, the others are edited), or tensors recorded in an earlier run (Mode::Record then
// Mode::Edit; every row of `roles` is edited; memory: the recorded q and k of every selected layer).
class CrossAttentionEdit : public AttentionProcessor {
 public:
  enum class Mode { Off, Record, Edit };
  enum class Source { Batch, Recorded };
  struct Options {
    at::Tensor mapper;     // [text_src, text_tgt]; undefined: identity
    at::Tensor alpha;      // [text_tgt] in [0, 1]; undefined: all 1 (all 0 when there is no source)
    at::Tensor reweight;   // [text_tgt]; undefined: all 1
    std::set<int> layers;  // cross-attention layers to edit (empty: all)
    bool self_inject = false;
    std::set<int> self_layers;  // self-attention layers to inject (empty: all)
    std::vector<RowRole> roles;  // Source::Recorded: rows edited (empty: every row)
    Source source = Source::Batch;
    bool use_source = true;     // false: reweight only
  };
  explicit CrossAttentionEdit(Options options);
  void set_mode(Mode mode) { mode_ = mode; }
  Mode mode() const { return mode_; }
  Options& options() { return options_; }
  void clear_recorded() { recorded_.clear(); }
  at::Tensor process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call, const AttentionFn& inner) override;

 private:
  bool targets(const AttentionSite& site) const;
  Options options_;
  Mode mode_ = Mode::Edit;
  std::map<std::pair<int, int>, std::pair<at::Tensor, at::Tensor>> recorded_;  // (layer, kind) -> (q, k)
};

// Keeps whole cross-attention outputs for reuse across steps (FreeSwim's cached mode): in Record
// mode each targeted call's output rows are computed and stored per (layer, row role) (on
// `storage`, e.g. the CPU to save accelerator memory); in Reuse mode the stored rows are returned
// instead of computing (a stored batch of 1 is broadcast to the query batch). Only calls whose
// rows all have one of `roles` (empty: any) are targeted; unlabelled rows count as RowRole::Cond.
// Off: pass-through.
class CrossAttentionOutputCache : public AttentionProcessor {
 public:
  enum class Mode { Off, Record, Reuse };
  explicit CrossAttentionOutputCache(std::vector<RowRole> roles = {},
                                     std::optional<at::Device> storage = std::nullopt);
  void set_mode(Mode mode) { mode_ = mode; }
  Mode mode() const { return mode_; }
  bool has(int layer, RowRole role = RowRole::Cond) const;
  // In Reuse mode, rows labelled `reader` get the outputs recorded for `recorded` (FreeSwim: the
  // PAG and skip-layer passes read the cond pass's full-path outputs, so with no perturbation they
  // equal the cond pass exactly).
  void reuse_for(RowRole reader, RowRole recorded) { aliases_[reader] = recorded; }
  std::int64_t stored_bytes() const;
  void clear() { store_.clear(); }
  at::Tensor process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call, const AttentionFn& inner) override;

 private:
  std::vector<RowRole> roles_;
  std::optional<at::Device> storage_;
  Mode mode_ = Mode::Off;
  std::map<std::pair<int, RowRole>, at::Tensor> store_;  // (layer, role) -> [1, heads, N, D]
  std::map<RowRole, RowRole> aliases_;                   // reader -> recorded role (Reuse mode)
};

}  // namespace vdit
