// Attention processors: see include/vdit/attention/processors.h.
#include "vdit/attention/processors.h"

#include "vdit/common.h"

#include <algorithm>
#include <cmath>
#include <sstream>

namespace vdit {
namespace {

// Rows [0, batch) as an index list, to compare with AttentionSite::rows_in.
bool is_every_row(const std::vector<std::int64_t>& rows, std::int64_t batch) {
  return static_cast<std::int64_t>(rows.size()) == batch;
}

at::Tensor row_index(const std::vector<std::int64_t>& rows, const at::Tensor& like) {
  return at::tensor(rows, at::TensorOptions().dtype(at::kLong)).to(like.device());
}

// The role of row r (unlabelled rows count as the prompt's).
RowRole role_of(const AttentionSite& site, std::int64_t r) {
  return site.rows && r < static_cast<std::int64_t>(site.rows->size()) ? (*site.rows)[static_cast<std::size_t>(r)]
                                                                        : RowRole::Cond;
}

bool layer_selected(const std::set<int>& layers, int layer) { return layers.empty() || layers.count(layer) > 0; }

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

at::Tensor run_chain(const std::vector<std::shared_ptr<AttentionProcessor>>& chain, std::size_t i,
                     const AttentionSite& site, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionCall& call, const AttentionFn& inner) {
  if (i == chain.size()) return inner(site, q, k, v, call);
  const AttentionFn next = [&chain, i, &inner](const AttentionSite& s, const at::Tensor& q2, const at::Tensor& k2,
                                               const at::Tensor& v2, const AttentionCall& c2) {
    return run_chain(chain, i + 1, s, q2, k2, v2, c2, inner);
  };
  return chain[i]->process(site, q, k, v, call, next);
}

}  // namespace

// ------------------------------------------------------------------------------- ProcessorChain

ProcessorChain::ProcessorChain(std::vector<std::shared_ptr<AttentionProcessor>> processors) {
  for (auto& p : processors) add(std::move(p));
}

ProcessorChain& ProcessorChain::add(std::shared_ptr<AttentionProcessor> processor) {
  if (!processor) throw InputError("ProcessorChain: cannot add a null processor");
  processors_.push_back(std::move(processor));
  return *this;
}

at::Tensor ProcessorChain::process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const AttentionCall& call, const AttentionFn& inner) {
  return run_chain(processors_, 0, site, q, k, v, call, inner);
}

// ----------------------------------------------------------------------------- HeadPerturbation

HeadPerturbation::HeadPerturbation(std::map<HeadKey, double> weights, std::vector<RowRole> roles)
    : roles_(std::move(roles)) {
  for (const auto& [key, u] : weights) set_weight(key.first, key.second, u);
}

void HeadPerturbation::set_weight(int layer, int head, double u) {
  if (!(u >= 0.0 && u <= 1.0)) {
    throw InputError("SoftPAG weight u for layer " + std::to_string(layer) + " head " + std::to_string(head) +
                     " must be in [0, 1], got " + std::to_string(u));
  }
  if (layer < 0 || head < 0) throw InputError("SoftPAG: layer and head indices must be >= 0");
  if (u == 0.0)
    weights_.erase({layer, head});
  else
    weights_[{layer, head}] = u;
}

at::Tensor HeadPerturbation::process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const AttentionCall& call, const AttentionFn& inner) {
  if (!enabled_ || site.kind != AttentionKind::Self) return inner(site, q, k, v, call);
  const std::int64_t B = q.size(0), H = q.size(1);
  const std::vector<std::int64_t> rows = site.rows_in(roles_, B);
  // This call's heads are the global heads [head_offset, head_offset + H). Heads outside it are
  // another call's: a sequence-parallel rank holds a slice, and rank 0's slice also starts at 0,
  // so a head past this call is not an error here (head sets are checked against the model's
  // head count when they are parsed: check_head_set).
  std::vector<std::pair<std::int64_t, double>> heads;  // (local head, u)
  for (auto it = weights_.lower_bound({site.layer, 0}); it != weights_.end() && it->first.first == site.layer; ++it) {
    const std::int64_t local = it->first.second - site.head_offset;
    if (local >= 0 && local < H) heads.emplace_back(local, it->second);
  }
  if (heads.empty() || rows.empty()) return inner(site, q, k, v, call);
  if (v.dim() != 4 || v.size(2) != q.size(2)) {
    throw InputError("SoftPAG needs self-attention (v with as many tokens as q), got q " + shape_of(q) + ", v " + shape_of(v));
  }
  bool all_identity = static_cast<std::int64_t>(heads.size()) == H;
  for (const auto& [h, u] : heads) all_identity = all_identity && u == 1.0;
  const bool every_row = is_every_row(rows, B);
  // Every head of every row replaced by V (PAG on the whole layer): no attention to compute.
  if (all_identity && every_row) return v.clone();
  // A copy, so a tensor owned by another processor (a cache) is never modified.
  at::Tensor out = inner(site, q, k, v, call).clone();
  for (std::int64_t r : rows) {
    for (const auto& [h, u] : heads) {
      at::Tensor oh = out.select(0, r).select(0, h);
      // lerp is exact at both ends: u = 1 gives V bitwise.
      oh.copy_(at::lerp(oh.to(at::kFloat), v.select(0, r).select(0, h).to(at::kFloat), u));
    }
  }
  return out;
}

// --------------------------------------------------------------------- CrossAttentionMapCapture

CrossAttentionMapCapture::CrossAttentionMapCapture(Options options) : options_(std::move(options)) {
  for (auto p : options_.pool)
    if (p < 1) throw InputError("attention map capture: pool factors must be >= 1");
  if (options_.query_block < 1) throw InputError("attention map capture: query_block must be >= 1");
}

void CrossAttentionMapCapture::clear() {
  sums_ = at::Tensor();
  cell_sizes_ = at::Tensor();
  heads_ = calls_ = 0;
}

namespace {

// Sum-pools [..., T, H, W] by (pt, ph, pw) with ceil division (zero padding).
at::Tensor sum_pool3(const at::Tensor& x, const std::array<std::int64_t, 3>& pool) {
  const auto n = x.dim();
  const std::int64_t T = x.size(n - 3), H = x.size(n - 2), W = x.size(n - 1);
  const std::int64_t Tp = (T + pool[0] - 1) / pool[0], Hp = (H + pool[1] - 1) / pool[1], Wp = (W + pool[2] - 1) / pool[2];
  at::Tensor padded = at::constant_pad_nd(x, {0, Wp * pool[2] - W, 0, Hp * pool[1] - H, 0, Tp * pool[0] - T}, 0);
  std::vector<std::int64_t> shape(x.sizes().begin(), x.sizes().end() - 3);
  const std::int64_t lead = static_cast<std::int64_t>(shape.size());
  for (std::int64_t s : {Tp, pool[0], Hp, pool[1], Wp, pool[2]}) shape.push_back(s);
  return padded.reshape(shape).sum({lead + 1, lead + 3, lead + 5});
}

}  // namespace

at::Tensor CrossAttentionMapCapture::process(const AttentionSite& site, const at::Tensor& q_all, const at::Tensor& k_all,
                                             const at::Tensor& v, const AttentionCall& call, const AttentionFn& inner) {
  at::Tensor out = inner(site, q_all, k_all, v, call);
  if (!enabled_ || site.kind != AttentionKind::Cross || !layer_selected(options_.layers, site.layer)) return out;
  const std::vector<std::int64_t> rows = site.rows_in(options_.roles, q_all.size(0));
  if (rows.empty()) return out;
  at::NoGradGuard no_grad;
  // Only the captured rows' probabilities are computed.
  const bool every_row = is_every_row(rows, q_all.size(0));
  const at::Tensor q = every_row ? q_all : q_all.index_select(0, row_index(rows, q_all));
  const at::Tensor k = every_row || k_all.size(0) == 1 ? k_all : k_all.index_select(0, row_index(rows, k_all));
  const std::int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2);
  const std::int64_t valid = call.valid_keys >= 0 ? std::min(call.valid_keys, Nk) : Nk;
  const Grid3 grid = call.grid.numel() == Nq ? call.grid : Grid3{1, 1, Nq};
  const auto& pool = options_.pool;
  const std::int64_t Tp = (grid.t + pool[0] - 1) / pool[0], Hp = (grid.h + pool[1] - 1) / pool[1],
                     Wp = (grid.w + pool[2] - 1) / pool[2];
  if (!sums_.defined()) {
    sums_ = at::zeros({B, Nk, Tp, Hp, Wp}, q.options().dtype(at::kFloat));
    cell_sizes_ = sum_pool3(at::ones({grid.t, grid.h, grid.w}, q.options().dtype(at::kFloat)), pool);
    heads_ = H;
  } else if (sums_.size(0) != B || sums_.size(1) != Nk || sums_.size(2) != Tp || sums_.size(3) != Hp ||
             sums_.size(4) != Wp || heads_ != H) {
    throw InputError("attention map capture: layer " + std::to_string(site.layer) + " has q " + shape_of(q) + ", k " +
                     shape_of(k) + ", unlike earlier captures (clear() between runs of different shapes)");
  }
  const double scale = effective_scale(call, q.size(3));
  const at::Tensor kt = k.narrow(2, 0, valid).to(at::kFloat).transpose(-2, -1);
  // Whole pooled frame groups per block, so the t pooling stays inside a block.
  const std::int64_t slab = pool[0] * grid.h * grid.w;
  const std::int64_t block_rows = std::max<std::int64_t>(1, options_.query_block / slab) * slab;
  for (std::int64_t s = 0; s < Nq; s += block_rows) {
    const std::int64_t e = std::min(Nq, s + block_rows);
    at::Tensor probs = at::softmax(at::matmul(q.slice(2, s, e).to(at::kFloat), kt).mul_(scale), -1);  // [B,H,r,valid]
    at::Tensor per_token = probs.sum(1).transpose(1, 2);  // [B, valid, r]
    if (valid < Nk) per_token = at::constant_pad_nd(per_token, {0, 0, 0, Nk - valid}, 0);
    const std::int64_t frames = (e - s) / (grid.h * grid.w);
    const at::Tensor pooled = sum_pool3(per_token.reshape({B, Nk, frames, grid.h, grid.w}), pool);
    sums_.narrow(2, s / slab, pooled.size(2)).add_(pooled);
  }
  calls_ += 1;
  return out;
}

at::Tensor CrossAttentionMapCapture::maps() const {
  if (!sums_.defined()) return at::Tensor();
  return sums_ / (cell_sizes_ * static_cast<double>(heads_ * calls_));
}

// --------------------------------------------------------------------------- CrossAttentionEdit

CrossAttentionEdit::CrossAttentionEdit(Options options) : options_(std::move(options)) {
  if (options_.mapper.defined() && options_.mapper.dim() != 2)
    throw InputError("cross-attention edit: mapper must be [text_src, text_tgt], got " + shape_of(options_.mapper));
  if (options_.alpha.defined() && options_.alpha.dim() != 1)
    throw InputError("cross-attention edit: alpha must be a vector over target text tokens");
  if (options_.reweight.defined() && options_.reweight.dim() != 1)
    throw InputError("cross-attention edit: reweight must be a vector over target text tokens");
}

bool CrossAttentionEdit::targets(const AttentionSite& site) const {
  if (site.kind == AttentionKind::Cross) return layer_selected(options_.layers, site.layer);
  return options_.self_inject && layer_selected(options_.self_layers, site.layer);
}

at::Tensor CrossAttentionEdit::process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const AttentionCall& call, const AttentionFn& inner) {
  if (mode_ == Mode::Off || !targets(site)) return inner(site, q, k, v, call);
  const std::pair<int, int> key{site.layer, static_cast<int>(site.kind)};
  if (mode_ == Mode::Record) {
    recorded_[key] = {q.detach().clone(), k.detach().clone()};
    return inner(site, q, k, v, call);
  }
  const bool cross = site.kind == AttentionKind::Cross;
  const bool need_source = !cross || options_.use_source;
  const std::int64_t B = q.size(0);
  // The edited rows and the source row (Source::Batch) of this call.
  std::vector<std::int64_t> edited_rows, source_rows;
  if (options_.source == Source::Batch) {
    if (site.rows) {
      source_rows = site.rows_in({RowRole::Source}, B);
      edited_rows = site.rows_in({RowRole::Target}, B);
      if (source_rows.size() > 1)
        throw InputError("cross-attention edit: " + std::to_string(source_rows.size()) + " source rows in one call");
    } else if (need_source) {
      source_rows = {0};
      for (std::int64_t r = 1; r < B; ++r) edited_rows.push_back(r);
    } else {
      for (std::int64_t r = 0; r < B; ++r) edited_rows.push_back(r);  // a pure reweight edits every row
    }
    if (edited_rows.empty() || (need_source && source_rows.empty())) return inner(site, q, k, v, call);
  } else {
    edited_rows = site.rows_in(options_.roles, B);
    if (edited_rows.empty()) return inner(site, q, k, v, call);
  }
  const auto rows_of = [](const at::Tensor& t, const std::vector<std::int64_t>& rows) {
    return t.index_select(0, row_index(rows, t));
  };
  const bool all_edited = is_every_row(edited_rows, B);
  at::Tensor qt = all_edited ? q : rows_of(q, edited_rows), kt = all_edited ? k : rows_of(k, edited_rows),
             vt = all_edited ? v : rows_of(v, edited_rows);
  at::Tensor qs, ks;
  if (need_source) {
    if (options_.source == Source::Batch) {
      qs = rows_of(q, source_rows);
      ks = rows_of(k, source_rows);
    } else {
      auto it = recorded_.find(key);
      if (it == recorded_.end())
        throw RuntimeError("cross-attention edit: nothing recorded for layer " + std::to_string(site.layer) +
                           (cross ? " (cross)" : " (self)") + "; run the source in Record mode first");
      qs = it->second.first.to(q.device(), q.scalar_type());
      ks = it->second.second.to(k.device(), k.scalar_type());
    }
    const std::int64_t bt = qt.size(0);
    if (qs.size(0) != 1 && qs.size(0) != bt)
      throw InputError("cross-attention edit: source batch " + std::to_string(qs.size(0)) + " vs target batch " +
                       std::to_string(bt));
    if (qs.size(1) != q.size(1) || qs.size(2) != q.size(2) || qs.size(3) != q.size(3))
      throw InputError("cross-attention edit: source q " + shape_of(qs) + " does not match target q " + shape_of(q));
    qs = qs.expand({bt, -1, -1, -1});
    ks = ks.expand({bt, -1, -1, -1});
  }
  at::Tensor edited;
  if (!cross) {
    // Self-attention injection: the source's map with the target's values.
    edited = inner(site, qs, ks, vt, call);
  } else {
    const std::int64_t nt = vt.size(2);
    auto token_vector = [&](const at::Tensor& t, const char* what) {
      if (t.size(0) != nt)
        throw InputError(std::string("cross-attention edit: ") + what + " has " + std::to_string(t.size(0)) +
                         " entries for " + std::to_string(nt) + " text tokens");
      return t.to(vt.device(), vt.scalar_type()).view({1, 1, nt, 1});
    };
    const at::Tensor cv = options_.reweight.defined() ? vt * token_vector(options_.reweight, "reweight") : vt;
    if (!options_.use_source) {
      edited = inner(site, qt, kt, cv, call);
    } else {
      const at::Tensor alpha = options_.alpha.defined() ? token_vector(options_.alpha, "alpha") : at::Tensor();
      at::Tensor vs = alpha.defined() ? cv * alpha : cv;
      if (options_.mapper.defined()) {
        if (options_.mapper.size(1) != nt || options_.mapper.size(0) != ks.size(2))
          throw InputError("cross-attention edit: mapper " + shape_of(options_.mapper) + " for " +
                           std::to_string(ks.size(2)) + " source and " + std::to_string(nt) + " target tokens");
        vs = matmul_f32_accumulate(options_.mapper.to(vt.device(), vt.scalar_type()), vs);
      }
      edited = inner(site, qs, ks, vs, call);
      if (alpha.defined() && !alpha.eq(1).all().item<bool>()) edited = edited + inner(site, qt, kt, cv * (1 - alpha), call);
    }
  }
  if (all_edited) return edited;
  // The rows not edited (the source, an unconditional row) are computed as they are.
  std::vector<std::int64_t> kept_rows;
  for (std::int64_t r = 0, e = 0; r < B; ++r) {
    if (e < static_cast<std::int64_t>(edited_rows.size()) && edited_rows[static_cast<std::size_t>(e)] == r) ++e;
    else kept_rows.push_back(r);
  }
  at::Tensor out = at::empty({B, edited.size(1), edited.size(2), edited.size(3)}, edited.options());
  out.index_copy_(0, row_index(kept_rows, out), inner(site, rows_of(q, kept_rows), rows_of(k, kept_rows), rows_of(v, kept_rows), call));
  out.index_copy_(0, row_index(edited_rows, out), edited);
  return out;
}

// -------------------------------------------------------------------- CrossAttentionOutputCache

CrossAttentionOutputCache::CrossAttentionOutputCache(std::vector<RowRole> roles, std::optional<at::Device> storage)
    : roles_(std::move(roles)), storage_(storage) {}

bool CrossAttentionOutputCache::has(int layer, RowRole role) const { return store_.count({layer, role}) > 0; }

std::int64_t CrossAttentionOutputCache::stored_bytes() const {
  std::int64_t total = 0;
  for (const auto& [key, t] : store_) total += t.numel() * static_cast<std::int64_t>(t.element_size());
  return total;
}

at::Tensor CrossAttentionOutputCache::process(const AttentionSite& site, const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const AttentionCall& call, const AttentionFn& inner) {
  if (mode_ == Mode::Off || site.kind != AttentionKind::Cross) return inner(site, q, k, v, call);
  const std::int64_t B = q.size(0);
  // The roles of this call's rows (a reader's as the role it reads, when reusing), and whether the
  // cache acts on all of them.
  std::vector<RowRole> roles;
  for (std::int64_t r = 0; r < B; ++r) {
    RowRole role = role_of(site, r);
    if (mode_ == Mode::Reuse) {
      const auto alias = aliases_.find(role);
      if (alias != aliases_.end()) role = alias->second;
    }
    roles.push_back(role);
  }
  const bool all_targeted = std::all_of(roles.begin(), roles.end(), [&](RowRole r) {
    return std::find(roles_.begin(), roles_.end(), r) != roles_.end();
  });
  if (!roles_.empty() && !all_targeted && site.rows) return inner(site, q, k, v, call);
  const bool one_role = std::all_of(roles.begin(), roles.end(), [&](RowRole r) { return r == roles.front(); });
  if (!one_role)
    throw RuntimeError("cross-attention cache: a call mixes row roles; run the cached rows in a forward of their own");
  const std::pair<int, RowRole> key{site.layer, roles.front()};
  if (mode_ == Mode::Record) {
    at::Tensor out = inner(site, q, k, v, call);
    const at::Device where = storage_ ? *storage_ : out.device();
    store_[key] = out.detach().to(where, out.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    return out;
  }
  auto it = store_.find(key);
  if (it == store_.end()) {
    throw RuntimeError("cross-attention cache: nothing recorded for layer " + std::to_string(site.layer) + ", rows " +
                       role_name(key.second));
  }
  at::Tensor stored = it->second;
  if (stored.size(0) == 1 && B > 1) stored = stored.expand({B, -1, -1, -1});
  if (stored.size(0) != B || stored.size(1) != q.size(1) || stored.size(2) != q.size(2) || stored.size(3) != v.size(3)) {
    throw RuntimeError("cross-attention cache: layer " + std::to_string(site.layer) + " stored " + shape_of(it->second) +
                       " but this call has q " + shape_of(q));
  }
  // A fresh copy: callers may modify their attention output in place.
  return stored.to(q.device(), q.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
}

}  // namespace vdit
