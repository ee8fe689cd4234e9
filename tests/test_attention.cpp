// Attention engine: kernels against float64 materialised references, the NATTEN window rule
// against an independent brute force, and the hooks' exact invariants (ALGORITHMS.md §6 checks
// 1-5, 7, 9, 13, 14).
#include <catch2/catch.hpp>

#include "vdit/attention/attention.h"
#include "vdit/attention/attention_bench.h"
#include "vdit/attention/processors.h"
#include "test_helpers.h"
#include "vdit/common.h"
#include "../attention/attention_internal.h"

#include <nlohmann/json.hpp>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <memory>
#include <random>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

using namespace vdit;

namespace {

at::Tensor randn(std::vector<std::int64_t> shape, std::uint64_t seed, at::ScalarType dtype = at::kFloat) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat)).to(dtype);
}

struct QKV {
  at::Tensor q, k, v;
};

QKV make_qkv(std::int64_t B, std::int64_t H, std::int64_t nq, std::int64_t nk, std::int64_t d, std::uint64_t seed,
             at::ScalarType dtype = at::kFloat, std::int64_t dv = -1) {
  // Scaled so that softmax is neither flat nor one-hot.
  return {randn({B, H, nq, d}, seed, dtype).mul(1.5).to(dtype), randn({B, H, nk, d}, seed + 1, dtype),
          randn({B, H, nk, dv < 0 ? d : dv}, seed + 2, dtype)};
}

// max |a − b| / max |b|.
double rel_err(const at::Tensor& a, const at::Tensor& ref) {
  const at::Tensor r = ref.to(at::kDouble);
  return (a.to(at::kDouble) - r).abs().max().item<double>() / std::max(r.abs().max().item<double>(), 1e-300);
}

at::Tensor reference(const QKV& t, const AttentionCall& call) {
  return attention_materialized(t.q.to(at::kDouble), t.k.to(at::kDouble), t.v.to(at::kDouble), call);
}

using vdit_test::bitwise_equal;

// Independent brute force of ALGORITHMS.md §2 (non-causal, stride 1) for one axis: is key y
// visible from query x?
bool natten_visible(std::int64_t n, std::int64_t k, std::int64_t dil, std::int64_t x, std::int64_t y) {
  if (k <= 0 || k >= n) return true;  // window covers the axis
  if (x % dil != y % dil) return false;
  const std::int64_t g = x % dil;
  const std::int64_t ng = n / dil + (g < n % dil ? 1 : 0);
  const std::int64_t kk = std::min(k, ng);
  const std::int64_t L = kk / 2, R = kk / 2 + kk % 2 - 1;
  const std::int64_t xq = x / dil, yk = y / dil;
  const std::int64_t leader = std::min(xq, ng - 1);
  const std::int64_t c = std::max(L, std::min(leader, ng - 1 - R));
  return c - L <= yk && yk <= c + R;
}

// FreeSwim's own formulation (init_mask_flex.get_mask): the e_lo/e_hi extensions.
bool freeswim_visible(std::int64_t n, std::int64_t d, std::int64_t x, std::int64_t y, bool inward) {
  const std::int64_t e_hi = inward ? std::max<std::int64_t>(0, d - x) : 0;
  const std::int64_t e_lo = inward ? std::max<std::int64_t>(0, d + x - n + 1) : 0;
  return y >= x - d - e_lo && y <= x + d + e_hi;
}

struct TuningGuard {
  AttentionTuning saved = attention_tuning();
  explicit TuningGuard(const AttentionTuning& t) { set_attention_tuning(t); }
  ~TuningGuard() { set_attention_tuning(saved); }
};

AttentionCall window_call(const Grid3& grid, std::array<std::int64_t, 3> size, std::array<std::int64_t, 3> dil = {1, 1, 1}) {
  AttentionCall call;
  call.grid = grid;
  call.window = Window3{size, dil};
  return call;
}

}  // namespace

TEST_CASE("neighbourhood mask equals the NATTEN formula brute force", "[attention]") {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const std::int64_t n = 1 + rng() % 13;
    const std::int64_t dil = 1 + rng() % 3;
    const std::int64_t k = rng() % (n + 3);  // includes 0 (whole axis) and k > n
    std::int64_t keys_per_query = -1;
    bool constant_count = true;
    for (std::int64_t x = 0; x < n; ++x) {
      const AxisRange r = window_axis_range(n, k, dil, x);
      std::int64_t count = 0;
      for (std::int64_t y = 0; y < n; ++y) {
        const bool in_range = y >= r.first && y <= r.last && (y - r.first) % r.step == 0;
        REQUIRE(in_range == natten_visible(n, k, dil, x, y));
        count += in_range;
      }
      if (keys_per_query >= 0 && count != keys_per_query) constant_count = false;
      keys_per_query = count;
    }
    // Inward clamping: every query keeps exactly k keys when k·dilation ≤ n (NATTEN's domain).
    if (k > 0 && k < n && k * dil <= n) {
      CHECK(constant_count);
      CHECK(keys_per_query == k);
    }
  }
  // The 3D mask is the AND of the axes.
  const Grid3 grid{3, 5, 4};
  const Window3 w{{2, 3, 3}, {1, 2, 1}};
  const at::Tensor mask = neighborhood_mask(grid, w);
  auto acc = mask.accessor<bool, 2>();
  const std::int64_t n[3] = {3, 5, 4};
  for (std::int64_t a = 0; a < grid.numel(); ++a) {
    for (std::int64_t b = 0; b < grid.numel(); ++b) {
      const std::int64_t qa[3] = {a / 20, (a / 4) % 5, a % 4}, kb[3] = {b / 20, (b / 4) % 5, b % 4};
      bool vis = true;
      for (int ax = 0; ax < 3; ++ax) vis = vis && natten_visible(n[ax], w.size[ax], w.dilation[ax], qa[ax], kb[ax]);
      REQUIRE(acc[a][b] == vis);
    }
  }
}

TEST_CASE("FreeSwim inward mask is NATTEN's kernel 2d+1, no-inward differs only near borders", "[attention]") {
  for (std::int64_t n : {7, 10, 30}) {
    for (std::int64_t d : {1, 2, 4, 15}) {
      for (std::int64_t x = 0; x < n; ++x) {
        for (std::int64_t y = 0; y < n; ++y) {
          REQUIRE(freeswim_visible(n, d, x, y, true) == natten_visible(n, 2 * d + 1, 1, x, y));
          if (x >= d && x < n - d) REQUIRE(freeswim_visible(n, d, x, y, false) == freeswim_visible(n, d, x, y, true));
        }
      }
    }
  }
}

TEST_CASE("blocked full attention equals a float64 reference", "[attention]") {
  // Small blocks force several query and key blocks (online rescaling) and ragged tails.
  TuningGuard tuning(AttentionTuning{48, 80, 0, 0});
  SECTION("f32 self-attention, several blocks") {
    const QKV t = make_qkv(2, 3, 301, 301, 64, 11);
    AttentionCall call;
    const double err = rel_err(attention(t.q, t.k, t.v, call), reference(t, call));
    INFO("f32 rel err " << err);
    CHECK(err <= 1e-5);
  }
  SECTION("bf16, GEMMs widened to f32 and in bf16 (the AMX path)") {
    const QKV t = make_qkv(1, 4, 257, 333, 128, 21, at::kBFloat16);
    AttentionCall call;
    for (int gemm : {-1, 1}) {
      TuningGuard mode(AttentionTuning{48, 80, 0, 0, gemm});
      const at::Tensor out = attention(t.q, t.k, t.v, call);
      CHECK(out.scalar_type() == at::kBFloat16);
      const double err = rel_err(out, reference(t, call));
      INFO("bf16 gemm mode " << gemm << " rel err " << err);
      CHECK(err <= 1e-2);
    }
  }
  SECTION("cross-attention shapes, value dim != head dim, scale factor, [B,N,H,D] layout") {
    const QKV base = make_qkv(2, 5, 97, 33, 32, 31, at::kFloat, 48);
    // The layout the models pass: [B, N, H, D] seen through a transpose.
    QKV t{base.q.transpose(1, 2).contiguous().transpose(1, 2), base.k, base.v};
    AttentionCall call;
    call.scale = 0.2;
    call.scale_factor = 1.04608;
    const at::Tensor out = attention(t.q, t.k, t.v, call);
    CHECK(out.sizes() == at::IntArrayRef({2, 5, 97, 48}));
    CHECK(rel_err(out, reference(t, call)) <= 1e-5);
    CHECK(effective_scale(call, 32) == Approx(0.2 * 1.04608));
  }
  SECTION("generic backend and f64 inputs") {
    const QKV t = make_qkv(1, 2, 70, 90, 16, 41);
    AttentionCall call;
    call.backend = AttentionBackend::Generic;
    CHECK(rel_err(attention(t.q, t.k, t.v, call), reference(t, call)) <= 1e-5);
    AttentionCall plain;
    const QKV d{t.q.to(at::kDouble), t.k.to(at::kDouble), t.v.to(at::kDouble)};
    CHECK(rel_err(attention(d.q, d.k, d.v, plain), reference(t, plain)) <= 1e-12);
  }
}

TEST_CASE("online softmax over one key block equals the naive attention in f32", "[attention]") {
  // Check 5 with default blocks: a single key block, whole rows.
  const QKV t = make_qkv(1, 2, 500, 700, 64, 51);
  AttentionCall call;
  CHECK(rel_err(attention(t.q, t.k, t.v, call), attention_materialized(t.q, t.k, t.v, call)) <= 1e-5);
}

TEST_CASE("valid_keys masks the key suffix", "[attention]") {
  const QKV t = make_qkv(1, 3, 40, 24, 16, 61);
  for (std::int64_t valid : {1, 7, 24, 100}) {
    AttentionCall call;
    call.valid_keys = valid;
    const std::int64_t n = std::min<std::int64_t>(valid, 24);
    const QKV cut{t.q, t.k.narrow(2, 0, n), t.v.narrow(2, 0, n)};
    AttentionCall plain;
    CHECK(rel_err(attention(t.q, t.k, t.v, call), reference(cut, plain)) <= 1e-5);
    CHECK(rel_err(attention_materialized(t.q, t.k, t.v, call), reference(cut, plain)) <= 1e-5);
    call.backend = AttentionBackend::Generic;
    CHECK(rel_err(attention(t.q, t.k, t.v, call), reference(cut, plain)) <= 1e-5);
  }
  AttentionCall none;
  none.valid_keys = 0;
  CHECK(attention(t.q, t.k, t.v, none).abs().max().item<double>() == 0.0);
}

TEST_CASE("window covering the grid equals full attention exactly", "[attention]") {
  const Grid3 grid{3, 5, 6};
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    const QKV t = make_qkv(1, 2, grid.numel(), grid.numel(), 32, 71, dtype);
    AttentionCall full;
    full.grid = grid;
    const at::Tensor expected = attention(t.q, t.k, t.v, full);
    for (const auto& size : {std::array<std::int64_t, 3>{3, 5, 6}, {0, 0, 0}, {9, 50, 7}}) {
      CHECK(bitwise_equal(attention(t.q, t.k, t.v, window_call(grid, size, {1, 2, 3})), expected));
    }
  }
}

TEST_CASE("windowed attention equals the brute-force masked reference at every border", "[attention]") {
  struct Case {
    Grid3 grid;
    std::array<std::int64_t, 3> size, dil;
  };
  const std::vector<Case> cases = {
      {{1, 9, 9}, {1, 3, 3}, {1, 1, 1}},     // odd grid, odd window
      {{2, 8, 10}, {2, 4, 4}, {1, 1, 1}},    // even grid, even windows (asymmetric extents)
      {{3, 7, 8}, {0, 5, 3}, {1, 1, 1}},     // FreeSwim style: all frames, spatial window
      {{3, 6, 7}, {2, 9, 3}, {1, 1, 1}},     // window larger than an axis
      {{4, 9, 11}, {3, 3, 4}, {2, 2, 2}},    // dilation on every axis
      {{5, 5, 12}, {2, 2, 3}, {1, 3, 4}},    // dilation with groups shorter than the kernel
      {{2, 13, 6}, {1, 13, 5}, {1, 1, 1}},   // H = kernel
  };
  for (const Case& c : cases) {
    const std::int64_t n = c.grid.numel();
    const AttentionCall call = window_call(c.grid, c.size, c.dil);
    for (auto dtype : {at::kFloat, at::kBFloat16}) {
      const QKV t = make_qkv(2, 2, n, n, 32, 81 + n, dtype);
      const at::Tensor ref = reference(t, call);
      const double tol = dtype == at::kFloat ? 1e-5 : 1e-2;
      INFO("grid " << c.grid.t << "x" << c.grid.h << "x" << c.grid.w << " window " << c.size[0] << "," << c.size[1]
                   << "," << c.size[2] << " dilation " << c.dil[0] << "," << c.dil[1] << "," << c.dil[2]);
      CHECK(rel_err(attention(t.q, t.k, t.v, call), ref) <= tol);
      {
        // Tiny boxes and key chunks: many partial boxes, unions split across chunks.
        TuningGuard small(AttentionTuning{0, 0, 6, 7});
        CHECK(rel_err(attention(t.q, t.k, t.v, call), ref) <= tol);
      }
      if (dtype == at::kBFloat16) {
        // Both bf16 GEMM modes whatever this CPU's default (bf16 GEMMs with AMX, f32 without).
        for (int gemm : {-1, 1}) {
          TuningGuard mode(AttentionTuning{0, 0, 0, 0, gemm});
          INFO("bf16 gemm mode " << gemm);
          CHECK(rel_err(attention(t.q, t.k, t.v, call), ref) <= tol);
        }
      }
      AttentionCall generic = call;
      generic.backend = AttentionBackend::Generic;
      CHECK(rel_err(attention(t.q, t.k, t.v, generic), ref) <= tol);
    }
  }
}

TEST_CASE("windowed FLOP accounting", "[attention]") {
  const Grid3 grid{3, 7, 9};
  const AttentionCall call = window_call(grid, {2, 3, 5}, {1, 2, 1});
  const std::int64_t n = grid.numel();
  const AttentionCost cost = attention_cost(1, 2, n, n, 16, 16, at::kFloat, call);
  const double pairs = neighborhood_mask(grid, *call.window).sum().item<double>();
  CHECK(cost.flops_useful == Approx(4.0 * 2 * 16 * pairs));
  CHECK(cost.flops_spent >= cost.flops_useful);
  AttentionCall full;
  const AttentionCost fc = attention_cost(1, 2, n, n, 16, 16, at::kFloat, full);
  CHECK(fc.flops_spent == fc.flops_useful);
  CHECK(fc.flops_useful == Approx(4.0 * 2 * 16 * n * n));
  // Counters follow the calls.
  reset_attention_counters();
  const QKV t = make_qkv(1, 2, n, n, 16, 91);
  (void)attention(t.q, t.k, t.v, call);
  CHECK(attention_counters().calls == 1);
  CHECK(attention_counters().flops_useful == Approx(cost.flops_useful));
  // Wan 1.3B 480p: the kernel's scratch stays far below 1 GB.
  AttentionCall wan;
  const AttentionCost w = attention_cost(1, 12, 32760, 32760, 128, 128, at::kBFloat16, wan);
  CHECK(w.workspace_bytes < 256.0 * (1 << 20));
}

TEST_CASE("attention input errors are InputError", "[attention]") {
  const QKV t = make_qkv(1, 2, 12, 12, 8, 101);
  AttentionCall call;
  CHECK_THROWS_AS(attention(t.q.squeeze(0), t.k, t.v, call), InputError);
  CHECK_THROWS_AS(attention(t.q, t.k.narrow(3, 0, 4), t.v, call), InputError);
  CHECK_THROWS_AS(attention(t.q, t.k.to(at::kDouble), t.v, call), InputError);
  call.scale = -1;
  CHECK_THROWS_AS(attention(t.q, t.k, t.v, call), InputError);
  AttentionCall w = window_call({2, 2, 2}, {1, 1, 1});
  CHECK_THROWS_AS(attention(t.q, t.k, t.v, w), InputError);  // 12 tokens vs grid of 8
  w = window_call({1, 3, 4}, {1, 1, 1}, {1, 0, 1});
  CHECK_THROWS_AS(attention(t.q, t.k, t.v, w), InputError);
  CHECK_THROWS_AS(parse_grid("3,x,4"), InputError);
  CHECK_THROWS_AS(parse_window("3,4"), InputError);
  CHECK_FALSE(parse_window("full").has_value());
}

TEST_CASE("attention stays differentiable for autograd callers", "[attention]") {
  QKV t = make_qkv(1, 2, 10, 10, 8, 111);
  t.q.set_requires_grad(true);
  AttentionCall call;
  const at::Tensor out = attention(t.q, t.k, t.v, call);
  out.sum().backward();
  REQUIRE(t.q.grad().defined());
  const at::Tensor qd = t.q.detach().to(at::kDouble).set_requires_grad(true);
  attention_materialized(qd, t.k.to(at::kDouble), t.v.to(at::kDouble), call).sum().backward();
  CHECK(rel_err(t.q.grad(), qd.grad()) <= 1e-5);
}

TEST_CASE("SoftPAG head perturbation", "[attention]") {
  const QKV t = make_qkv(2, 4, 50, 50, 16, 121);
  AttentionCall call;
  AttentionSite site;
  site.layer = 3;
  site.kind = AttentionKind::Self;
  const at::Tensor plain = attention(t.q, t.k, t.v, call);
  SECTION("u = 0 changes nothing") {
    HeadPerturbation hook({{{3, 1}, 0.0}, {{3, 2}, 0.0}});
    CHECK(bitwise_equal(hook.attend(site, t.q, t.k, t.v, call), plain));
  }
  SECTION("u = 1 returns V on the chosen heads, other heads bitwise unchanged") {
    HeadPerturbation hook({{{3, 1}, 1.0}, {{3, 2}, 1.0}});
    const at::Tensor out = hook.attend(site, t.q, t.k, t.v, call);
    for (std::int64_t h = 0; h < 4; ++h) {
      const bool chosen = h == 1 || h == 2;
      CHECK(bitwise_equal(out.select(1, h), chosen ? t.v.select(1, h) : plain.select(1, h)));
    }
    HeadPerturbation all({{{3, 0}, 1.0}, {{3, 1}, 1.0}, {{3, 2}, 1.0}, {{3, 3}, 1.0}});
    CHECK(bitwise_equal(all.attend(site, t.q, t.k, t.v, call), t.v));
  }
  SECTION("intermediate u equals the explicit interpolated map") {
    const double u = 0.3;
    HeadPerturbation hook({{{3, 2}, u}});
    const at::Tensor out = hook.attend(site, t.q, t.k, t.v, call);
    const at::Tensor qd = t.q.select(1, 2).to(at::kDouble), kd = t.k.select(1, 2).to(at::kDouble);
    const at::Tensor map = at::softmax(at::matmul(qd, kd.transpose(-2, -1)) * effective_scale(call, 16), -1);
    const at::Tensor mixed = (1 - u) * map + u * at::eye(50, at::kDouble);
    CHECK(rel_err(out.select(1, 2), at::matmul(mixed, t.v.select(1, 2).to(at::kDouble))) <= 1e-5);
    CHECK(bitwise_equal(out.select(1, 0), plain.select(1, 0)));
  }
  SECTION("other layers, rows of other roles and cross-attention pass through") {
    HeadPerturbation hook({{{3, 1}, 1.0}}, {RowRole::Perturbed});
    AttentionSite other = site;
    other.layer = 4;
    CHECK(bitwise_equal(hook.attend(other, t.q, t.k, t.v, call), plain));
    other = site;
    const std::vector<RowRole> unperturbed{RowRole::Cond, RowRole::Uncond};
    other.rows = &unperturbed;
    CHECK(bitwise_equal(hook.attend(other, t.q, t.k, t.v, call), plain));
    // Unlabelled rows are not of the perturbed role either.
    CHECK(bitwise_equal(hook.attend(site, t.q, t.k, t.v, call), plain));
    other = site;
    other.kind = AttentionKind::Cross;
    CHECK(bitwise_equal(hook.attend(other, t.q, t.k, t.v, call), plain));
  }
  SECTION("only the rows of the chosen role are perturbed, in a batch of several roles") {
    HeadPerturbation hook({{{3, 1}, 1.0}}, {RowRole::Perturbed});
    AttentionSite labelled = site;
    const std::vector<RowRole> roles{RowRole::Cond, RowRole::Perturbed};
    labelled.rows = &roles;
    const at::Tensor out = hook.attend(labelled, t.q, t.k, t.v, call);
    CHECK(bitwise_equal(out.select(0, 0), plain.select(0, 0)));
    CHECK(bitwise_equal(out.select(0, 1).select(0, 1), t.v.select(0, 1).select(0, 1)));
    CHECK(bitwise_equal(out.select(0, 1).select(0, 0), plain.select(0, 1).select(0, 0)));
  }
  SECTION("heads are global: a call holding heads 2..3 of the layer perturbs its local head 0 for global head 2") {
    HeadPerturbation hook({{{3, 2}, 1.0}});
    AttentionSite slice = site;
    slice.head_offset = 2;
    const at::Tensor q2 = t.q.narrow(1, 2, 2), k2 = t.k.narrow(1, 2, 2), v2 = t.v.narrow(1, 2, 2);
    const at::Tensor out = hook.attend(slice, q2, k2, v2, call);
    CHECK(bitwise_equal(out.select(1, 0), v2.select(1, 0)));
    CHECK(bitwise_equal(out.select(1, 1), attention(q2, k2, v2, call).select(1, 1)));
    // Global head 1 is not in this slice: nothing changes.
    HeadPerturbation elsewhere({{{3, 1}, 1.0}});
    CHECK(bitwise_equal(elsewhere.attend(slice, q2, k2, v2, call), attention(q2, k2, v2, call)));
  }
  CHECK_THROWS_AS(HeadPerturbation({{{0, 0}, 1.5}}), InputError);
  // A head past this call belongs to another call's slice (under sequence parallelism rank 0's
  // slice starts at head 0 too), so it passes through; head sets are range-checked against the
  // model when parsed (check_head_set).
  CHECK(bitwise_equal(HeadPerturbation({{{3, 4}, 1.0}}).attend(site, t.q, t.k, t.v, call), attention(t.q, t.k, t.v, call)));
}

TEST_CASE("cross-attention output cache", "[attention]") {
  const QKV step0 = make_qkv(1, 2, 30, 12, 16, 131);
  const QKV step1 = make_qkv(1, 2, 30, 12, 16, 141);
  AttentionCall call;
  AttentionSite site;
  site.kind = AttentionKind::Cross;
  site.layer = 5;
  CrossAttentionOutputCache cache({RowRole::Cond}, at::Device(at::kCPU));
  CHECK(bitwise_equal(cache.attend(site, step0.q, step0.k, step0.v, call), attention(step0.q, step0.k, step0.v, call)));
  CHECK_FALSE(cache.has(5, RowRole::Cond));  // Off: nothing stored
  cache.set_mode(CrossAttentionOutputCache::Mode::Record);
  const at::Tensor recorded = cache.attend(site, step0.q, step0.k, step0.v, call);
  CHECK(cache.has(5, RowRole::Cond));
  CHECK(cache.stored_bytes() == recorded.numel() * 4);
  cache.set_mode(CrossAttentionOutputCache::Mode::Reuse);
  // Reuse returns the recorded output (computed from step 0) even for step 1's inputs, and equals a
  // recomputation from step 0.
  const at::Tensor reused = cache.attend(site, step1.q, step1.k, step1.v, call);
  CHECK(bitwise_equal(reused, attention(step0.q, step0.k, step0.v, call)));
  reused.add_(1.0);  // callers may modify it: the cache keeps its own copy
  CHECK(bitwise_equal(cache.attend(site, step1.q, step1.k, step1.v, call), recorded));
  // A batch of 2 reuses a stored batch of 1.
  const QKV two = make_qkv(2, 2, 30, 12, 16, 151);
  CHECK(bitwise_equal(cache.attend(site, two.q, two.k, two.v, call).select(0, 1), recorded.select(0, 0)));
  // Rows of other roles and self-attention are computed.
  AttentionSite uncond = site;
  const std::vector<RowRole> uncond_rows{RowRole::Uncond};
  uncond.rows = &uncond_rows;
  CHECK(bitwise_equal(cache.attend(uncond, step1.q, step1.k, step1.v, call), attention(step1.q, step1.k, step1.v, call)));
  AttentionSite missing = site;
  missing.layer = 6;
  CHECK_THROWS_AS(cache.attend(missing, step1.q, step1.k, step1.v, call), RuntimeError);
}

TEST_CASE("cross-attention map capture", "[attention]") {
  const Grid3 grid{3, 4, 5};
  const std::int64_t nq = grid.numel(), nt = 9;
  const QKV a = make_qkv(2, 3, nq, nt, 16, 161);
  const QKV b = make_qkv(2, 3, nq, nt, 16, 171);
  AttentionCall call;
  call.grid = grid;
  AttentionSite site;
  site.kind = AttentionKind::Cross;
  SECTION("unpooled maps are the mean probabilities and sum to 1 over text tokens") {
    CrossAttentionMapCapture::Options o;
    o.query_block = 7;  // several blocks
    CrossAttentionMapCapture capture(o);
    CHECK(bitwise_equal(capture.attend(site, a.q, a.k, a.v, call), attention(a.q, a.k, a.v, call)));
    site.layer = 1;
    capture.attend(site, b.q, b.k, b.v, call);
    CHECK(capture.captured_calls() == 2);
    const at::Tensor maps = capture.maps();  // [B, nt, T, H, W]
    REQUIRE(maps.sizes() == at::IntArrayRef({2, nt, 3, 4, 5}));
    CHECK((maps.sum(1) - 1).abs().max().item<double>() < 1e-5);
    const double s = effective_scale(call, 16);
    auto probs = [&](const QKV& t) {
      return at::softmax(at::matmul(t.q.to(at::kDouble), t.k.to(at::kDouble).transpose(-2, -1)) * s, -1).mean(1);
    };
    const at::Tensor expected = ((probs(a) + probs(b)) / 2).transpose(1, 2).reshape({2, nt, 3, 4, 5});
    CHECK(rel_err(maps, expected) <= 1e-5);
  }
  SECTION("pooled maps with masked keys still sum to 1 per cell") {
    CrossAttentionMapCapture::Options o;
    o.pool = {2, 3, 2};
    o.layers = {0};
    CrossAttentionMapCapture capture(o);
    AttentionCall masked = call;
    masked.valid_keys = 6;
    capture.attend(site, a.q, a.k, a.v, masked);
    site.layer = 2;  // not captured
    capture.attend(site, b.q, b.k, b.v, masked);
    CHECK(capture.captured_calls() == 1);
    const at::Tensor maps = capture.maps();
    REQUIRE(maps.sizes() == at::IntArrayRef({2, nt, 2, 2, 3}));
    CHECK((maps.sum(1) - 1).abs().max().item<double>() < 1e-5);
    CHECK(maps.narrow(1, 6, nt - 6).abs().max().item<double>() == 0.0);
  }
}

TEST_CASE("cross-attention edits (prompt-to-prompt algebra)", "[attention]") {
  const std::int64_t nt = 8;
  const QKV src = make_qkv(1, 2, 40, nt, 16, 181);
  const QKV tgt = make_qkv(1, 2, 40, nt, 16, 191);
  const QKV batch{at::cat({src.q, tgt.q}), at::cat({src.k, tgt.k}), at::cat({src.v, tgt.v})};
  AttentionCall call;
  AttentionSite site;
  site.kind = AttentionKind::Cross;
  SECTION("reweight c = 1 is the identity; reweight scales V per token") {
    CrossAttentionEdit::Options o;
    o.use_source = false;
    o.reweight = at::ones({nt});
    CrossAttentionEdit edit(o);
    CHECK(bitwise_equal(edit.attend(site, tgt.q, tgt.k, tgt.v, call), attention(tgt.q, tgt.k, tgt.v, call)));
    at::Tensor c = at::ones({nt});
    c[3] = 2.5;
    edit.options().reweight = c;
    const at::Tensor out = edit.attend(site, tgt.q, tgt.k, tgt.v, call);
    CHECK(rel_err(out, reference({tgt.q, tgt.k, tgt.v * c.view({1, 1, nt, 1})}, call)) <= 1e-5);
  }
  SECTION("replace with a permutation mapper equals attention with permuted V") {
    const at::Tensor perm = at::randperm(nt, at::kLong);
    CrossAttentionEdit::Options o;
    o.mapper = at::zeros({nt, nt});
    for (std::int64_t j = 0; j < nt; ++j) o.mapper[perm[j].item<std::int64_t>()][j] = 1.0;  // M[perm[j], j] = 1
    CrossAttentionEdit edit(o);
    const at::Tensor out = edit.attend(site, batch.q, batch.k, batch.v, call);
    // A* = A_src M: column perm[j] of A_src moves to column j, so out = A_src · V', V'[perm[j]] = V_tgt[j].
    const at::Tensor vperm = at::empty_like(tgt.v);
    vperm.index_copy_(2, perm, tgt.v);
    CHECK(rel_err(out.narrow(0, 1, 1), reference({src.q, src.k, vperm}, call)) <= 1e-5);
    CHECK(bitwise_equal(out.narrow(0, 0, 1), attention(src.q, src.k, src.v, call)));
  }
  SECTION("identical prompts: the target row reproduces the source row bitwise") {
    CrossAttentionEdit edit(CrossAttentionEdit::Options{});
    const QKV same{at::cat({src.q, src.q}), at::cat({src.k, src.k}), at::cat({src.v, src.v})};
    const at::Tensor out = edit.attend(site, same.q, same.k, same.v, call);
    CHECK(bitwise_equal(out.select(0, 1), out.select(0, 0)));
  }
  SECTION("refine-style alpha mixes source and target maps") {
    CrossAttentionEdit::Options o;
    o.alpha = at::tensor({1.f, 1.f, 0.f, 1.f, 0.f, 1.f, 1.f, 1.f});
    CrossAttentionEdit edit(o);
    const at::Tensor out = edit.attend(site, batch.q, batch.k, batch.v, call);
    const double s = effective_scale(call, 16);
    auto map = [&](const QKV& t) {
      return at::softmax(at::matmul(t.q.to(at::kDouble), t.k.to(at::kDouble).transpose(-2, -1)) * s, -1);
    };
    const at::Tensor a = o.alpha.to(at::kDouble);
    const at::Tensor mixed = map(src) * a + map(tgt) * (1 - a);
    CHECK(rel_err(out.narrow(0, 1, 1), at::matmul(mixed, tgt.v.to(at::kDouble))) <= 1e-5);
  }
  SECTION("self-attention injection (q_src, k_src, v_tgt) equals explicit map replacement; recorded source") {
    const QKV s_src = make_qkv(1, 2, 30, 30, 16, 201);
    const QKV s_tgt = make_qkv(1, 2, 30, 30, 16, 211);
    CrossAttentionEdit::Options o;
    o.self_inject = true;
    o.self_layers = {2};
    o.layers = {99};  // no cross layer
    o.source = CrossAttentionEdit::Source::Recorded;
    CrossAttentionEdit edit(o);
    AttentionSite self_site;
    self_site.kind = AttentionKind::Self;
    self_site.layer = 2;
    edit.set_mode(CrossAttentionEdit::Mode::Record);
    CHECK(bitwise_equal(edit.attend(self_site, s_src.q, s_src.k, s_src.v, call), attention(s_src.q, s_src.k, s_src.v, call)));
    edit.set_mode(CrossAttentionEdit::Mode::Edit);
    const at::Tensor out = edit.attend(self_site, s_tgt.q, s_tgt.k, s_tgt.v, call);
    const double s = effective_scale(call, 16);
    const at::Tensor src_map =
        at::softmax(at::matmul(s_src.q.to(at::kDouble), s_src.k.to(at::kDouble).transpose(-2, -1)) * s, -1);
    CHECK(rel_err(out, at::matmul(src_map, s_tgt.v.to(at::kDouble))) <= 1e-5);
    AttentionSite other = self_site;
    other.layer = 3;
    CHECK(bitwise_equal(edit.attend(other, s_tgt.q, s_tgt.k, s_tgt.v, call), attention(s_tgt.q, s_tgt.k, s_tgt.v, call)));
  }
}

TEST_CASE("processors compose in a ProcessorChain", "[attention]") {
  const Grid3 grid{2, 3, 4};
  const QKV self = make_qkv(1, 3, 24, 24, 16, 221);
  const QKV cross = make_qkv(1, 3, 24, 6, 16, 231);
  AttentionCall call;
  call.grid = grid;
  auto pag = std::make_shared<HeadPerturbation>(std::map<HeadPerturbation::HeadKey, double>{{{0, 1}, 1.0}});
  auto capture = std::make_shared<CrossAttentionMapCapture>();
  auto cache = std::make_shared<CrossAttentionOutputCache>();
  cache->set_mode(CrossAttentionOutputCache::Mode::Record);
  ProcessorChain chain({pag, capture, cache});
  AttentionSite s_site, c_site;
  c_site.kind = AttentionKind::Cross;
  const at::Tensor s_out = chain.attend(s_site, self.q, self.k, self.v, call);
  CHECK(bitwise_equal(s_out, HeadPerturbation({{{0, 1}, 1.0}}).attend(s_site, self.q, self.k, self.v, call)));
  const at::Tensor c_out = chain.attend(c_site, cross.q, cross.k, cross.v, call);
  CHECK(bitwise_equal(c_out, attention(cross.q, cross.k, cross.v, call)));
  CHECK(capture->captured_calls() == 1);
  CHECK(cache->has(0, RowRole::Cond));
  // Nested chains and an empty chain behave like the plain kernel.
  ProcessorChain outer;
  outer.add(std::make_shared<ProcessorChain>());
  CHECK(bitwise_equal(outer.attend(s_site, self.q, self.k, self.v, call), attention(self.q, self.k, self.v, call)));
}

TEST_CASE("attention benchmark reports one JSON object", "[attention]") {
  AttentionBenchOptions o;
  o.grid = Grid3{2, 6, 8};
  o.heads = 2;
  o.head_dim = 32;
  o.repeats = 1;
  o.dtype = at::kFloat;
  o.window = Window3{{0, 3, 3}, {1, 1, 1}};
  const nlohmann::json j = run_attention_bench(o);
  for (const char* key : {"backend", "tokens", "flops_useful", "flops_spent", "seconds", "gflops", "gemm_gflops",
                          "naive_seconds", "peak_extra_bytes", "full_seconds", "ideal_speedup"}) {
    INFO(key);
    CHECK(j.contains(key));
  }
  CHECK(j["tokens"].get<std::int64_t>() == 96);
  CHECK(j["naive_max_abs_diff"].get<double>() < 1e-4);
  CHECK(j["flops_spent"].get<double>() >= j["flops_useful"].get<double>());
}

TEST_CASE("vdit bench attention prints one JSON line", "[attention][cli]") {
  const std::string cmd = std::string(VDIT_BINARY) +
                          " --quiet bench attention --grid 2,4,4 --heads 2 --head-dim 16 --window 0,3,3 --dtype f32 --repeats 1";
  FILE* pipe = popen(cmd.c_str(), "r");
  REQUIRE(pipe);
  std::string out;
  char buf[4096];
  while (fgets(buf, sizeof buf, pipe)) out += buf;
  const int status = pclose(pipe);
  REQUIRE(status == 0);
  REQUIRE(std::count(out.begin(), out.end(), '\n') == 1);
  const auto j = nlohmann::json::parse(out);
  CHECK(j["tokens"].get<std::int64_t>() == 32);
  CHECK(j["dtype"].get<std::string>() == "f32");
  const std::string bad = std::string(VDIT_BINARY) + " --quiet bench attention --grid 2,x,4 2>/dev/null";
  const int bad_status = std::system(bad.c_str());
  CHECK(WEXITSTATUS(bad_status) == 2);
}

TEST_CASE("run_workers: every index once, on threads kept between calls, errors rethrown, nested calls inline",
          "[attention]") {
  // A thread's count of bodies it has run: fresh threads per call would start every call at 1.
  static thread_local int bodies_run_here = 0;
  const auto run = [](int workers) {
    std::mutex mutex;
    std::vector<int> count_by_worker(workers, 0), times_by_worker(workers, 0);
    std::vector<std::thread::id> ids;
    vdit::detail::run_workers(workers, [&](int w) {
      const int count = ++bodies_run_here;
      std::lock_guard<std::mutex> lock(mutex);
      count_by_worker.at(w) = count;
      ++times_by_worker.at(w);
      ids.push_back(std::this_thread::get_id());
    });
    for (int t : times_by_worker) REQUIRE(t == 1);
    for (const auto& id : ids) REQUIRE(id != std::this_thread::get_id());
    return count_by_worker;
  };
  const std::vector<int> first = run(3), second = run(3);
  for (int w = 0; w < 3; ++w) CHECK(second[w] == first[w] + 1);

  REQUIRE_THROWS_WITH(vdit::detail::run_workers(3,
                                                [](int w) {
                                                  if (w == 1) throw std::runtime_error("worker 1 failed");
                                                }),
                      "worker 1 failed");
  const std::vector<int> after_error = run(2);
  CHECK(after_error[0] == second[0] + 1);

  // Inside a worker the pool is busy: a nested call runs every index on that worker's thread.
  std::mutex mutex;
  std::vector<std::pair<std::thread::id, std::thread::id>> outer_inner;
  vdit::detail::run_workers(2, [&](int) {
    const auto outer = std::this_thread::get_id();
    vdit::detail::run_workers(3, [&](int) {
      std::lock_guard<std::mutex> lock(mutex);
      outer_inner.emplace_back(outer, std::this_thread::get_id());
    });
  });
  REQUIRE(outer_inner.size() == 6);
  for (const auto& [outer, inner] : outer_inner) CHECK(outer == inner);
}
