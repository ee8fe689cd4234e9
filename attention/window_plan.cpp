// Window geometry (NATTEN's clamped neighbourhood, ALGORITHMS.md §2) and the query-box planner
// of the windowed kernel. Boxes and their key unions are products of per-axis tiles, so the
// spent/useful FLOP ratio factorises per axis and the planner can search tile extents exactly.
#include "attention_internal.h"

#include "vdit/common.h"

#include <algorithm>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>

namespace vdit {
namespace {

// The NATTEN window of group coordinate x in a group of length ng with kernel k (k ≤ ng):
// left extent L = ⌊k/2⌋, right R = ⌊k/2⌋ + (k mod 2) − 1, centre clamped into [L, ng−1−R] so
// the window never leaves the group (the inward shift) and always holds k keys.
struct GroupWindow {
  std::int64_t L, R, ng;
  GroupWindow(std::int64_t kernel, std::int64_t group_length)
      : L(kernel / 2), R(kernel / 2 + kernel % 2 - 1), ng(group_length) {}
  std::int64_t centre(std::int64_t x) const { return std::clamp(x, L, ng - 1 - R); }
  std::int64_t first(std::int64_t x) const { return centre(x) - L; }
  std::int64_t last(std::int64_t x) const { return centre(x) + R; }
};

bool axis_full(std::int64_t n, std::int64_t kernel) { return kernel <= 0 || kernel >= n; }

}  // namespace

AxisRange window_axis_range(std::int64_t n, std::int64_t kernel, std::int64_t dilation, std::int64_t x) {
  if (n <= 0 || x < 0 || x >= n) throw InputError("window axis: coordinate " + std::to_string(x) + " outside [0, " + std::to_string(n) + ")");
  if (dilation < 1) throw InputError("window dilation must be >= 1, got " + std::to_string(dilation));
  if (axis_full(n, kernel)) return {0, n - 1, 1};
  const std::int64_t g = x % dilation;
  const std::int64_t ng = (n - g + dilation - 1) / dilation;
  const GroupWindow gw(std::min(kernel, ng), ng);
  const std::int64_t xg = x / dilation;
  return {g + dilation * gw.first(xg), g + dilation * gw.last(xg), dilation};
}

at::Tensor neighborhood_mask(const Grid3& grid, const Window3& window) {
  const std::int64_t n[3] = {grid.t, grid.h, grid.w};
  at::Tensor mask;
  for (int a = 0; a < 3; ++a) {
    // Per-axis [n, n] visibility, then the AND over axes as a Kronecker product.
    at::Tensor m = at::zeros({n[a], n[a]}, at::kBool);
    auto acc = m.accessor<bool, 2>();
    for (std::int64_t x = 0; x < n[a]; ++x) {
      const AxisRange r = window_axis_range(n[a], window.size[a], window.dilation[a], x);
      for (std::int64_t y = r.first; y <= r.last; y += r.step) acc[x][y] = true;
    }
    mask = mask.defined() ? at::logical_and(mask.unsqueeze(1).unsqueeze(3), m.unsqueeze(0).unsqueeze(2))
                                .reshape({mask.size(0) * n[a], mask.size(1) * n[a]})
                          : m;
  }
  return mask;
}

namespace detail {

AxisTiling tile_axis(std::int64_t n, std::int64_t kernel, std::int64_t dilation, std::int64_t extent) {
  AxisTiling tiling;
  tiling.n = n;
  tiling.full = axis_full(n, kernel);
  tiling.extent = std::max<std::int64_t>(1, extent);
  const std::int64_t step = tiling.full ? 1 : std::max<std::int64_t>(1, dilation);
  const std::int64_t k = tiling.full ? n : kernel;
  for (std::int64_t g = 0; g < std::min(step, n); ++g) {
    const std::int64_t ng = (n - g + step - 1) / step;
    const GroupWindow gw(std::min(k, ng), ng);
    for (std::int64_t a = 0; a < ng; a += tiling.extent) {
      const std::int64_t b = std::min(a + tiling.extent, ng);
      AxisTile tile;
      tile.step = step;
      tile.q_first = g + step * a;
      tile.q_count = b - a;
      const std::int64_t ulo = gw.first(a), uhi = gw.last(b - 1);
      tile.k_first = g + step * ulo;
      tile.k_count = uhi - ulo + 1;
      tile.dense = true;
      for (std::int64_t x = a; x < b; ++x) {
        tile.lo.push_back(static_cast<std::int32_t>(gw.first(x) - ulo));
        tile.hi.push_back(static_cast<std::int32_t>(gw.last(x) - ulo));
        tile.dense = tile.dense && tile.lo.back() == 0 && tile.hi.back() == tile.k_count - 1;
      }
      tiling.visible += static_cast<double>(tile.q_count) * std::min(k, ng);
      tiling.spent += static_cast<double>(tile.q_count) * tile.k_count;
      tiling.tiles.push_back(std::move(tile));
    }
  }
  return tiling;
}

bool window_is_full(const Grid3& grid, const Window3& window) {
  const std::int64_t n[3] = {grid.t, grid.h, grid.w};
  for (int a = 0; a < 3; ++a)
    if (!axis_full(n[a], window.size[a])) return false;
  return true;
}

std::array<std::int64_t, 3> chunk_extents(const std::array<std::int64_t, 3>& e, std::int64_t limit) {
  limit = std::max<std::int64_t>(1, limit);
  // Split the outermost axis that must be split, into near-equal chunks.
  auto balanced = [](std::int64_t n, std::int64_t most) {
    const std::int64_t parts = (n + most - 1) / most;
    return (n + parts - 1) / parts;
  };
  if (e[0] * e[1] * e[2] <= limit) return e;
  if (e[1] * e[2] <= limit) return {balanced(e[0], limit / (e[1] * e[2])), e[1], e[2]};
  if (e[2] <= limit) return {1, balanced(e[1], limit / e[2]), e[2]};
  return {1, 1, balanced(e[2], limit)};
}

namespace {

constexpr std::int64_t kDefaultWindowQueries = 512;
// Key chunks of 2048: measured on the 20 % window of Wan 480p (21x30x52, 4 heads, bf16, AMD EPYC),
// one process per setting, median of 3: 8192 keys 2.25-2.36 s (0.63-0.66 of the ideal speed-up
// over full attention), 4096 1.73 s (0.76), 2048 1.76 s (0.79); 4096 and 2048 are within this
// machine's noise, and the smaller chunk keeps the per-worker score block 4x smaller.
constexpr std::int64_t kDefaultWindowKeys = 2048;
// Per-row overhead of a box (gathers, softmax row set-up, GEMM edge effects) in units of "one
// more query row of work": a box of Q queries costs about spent·(1 + kRowOverhead/Q).
constexpr double kRowOverhead = 48.0;

std::shared_ptr<const WindowPlan> build_plan(const Grid3& grid, const Window3& window, std::int64_t max_queries,
                                             std::int64_t max_keys) {
  const std::int64_t n[3] = {grid.t, grid.h, grid.w};
  // Per axis: the candidate extents (1..64, and the whole axis) and the keys each tiling spends.
  struct Candidate {
    std::int64_t extent;
    double spent;
  };
  std::vector<Candidate> cands[3];
  for (int a = 0; a < 3; ++a) {
    const bool full = axis_full(n[a], window.size[a]);
    const std::int64_t step = full ? 1 : window.dilation[a];
    const std::int64_t longest = (n[a] + step - 1) / step;
    const std::int64_t top = std::min<std::int64_t>(longest, 64);
    for (std::int64_t e = 1; e <= top; ++e) cands[a].push_back({e, tile_axis(n[a], window.size[a], window.dilation[a], e).spent});
    if (longest > top) cands[a].push_back({longest, tile_axis(n[a], window.size[a], window.dilation[a], longest).spent});
  }
  double best = std::numeric_limits<double>::infinity();
  std::int64_t pick[3] = {1, 1, 1};
  for (const auto& ct : cands[0]) {
    for (const auto& ch : cands[1]) {
      if (ct.extent * ch.extent > max_queries) break;
      for (const auto& cw : cands[2]) {
        const std::int64_t q = ct.extent * ch.extent * cw.extent;
        if (q > max_queries) break;
        const double score = ct.spent * ch.spent * cw.spent * (1.0 + kRowOverhead / static_cast<double>(q));
        if (score < best) {
          best = score;
          pick[0] = ct.extent;
          pick[1] = ch.extent;
          pick[2] = cw.extent;
        }
      }
    }
  }
  auto plan = std::make_shared<WindowPlan>();
  plan->visible_pairs = 1;
  plan->spent_pairs = 1;
  for (int a = 0; a < 3; ++a) {
    plan->axis[a] = tile_axis(n[a], window.size[a], window.dilation[a], pick[a]);
    plan->visible_pairs *= plan->axis[a].visible;
    plan->spent_pairs *= plan->axis[a].spent;
  }
  std::int64_t qmax = 1;
  for (int a = 0; a < 3; ++a) {
    std::int64_t m = 0;
    for (const auto& t : plan->axis[a].tiles) m = std::max(m, t.q_count);
    qmax *= m;
  }
  plan->max_box_queries = qmax;
  plan->max_chunk_keys = max_keys;
  return plan;
}

}  // namespace

std::shared_ptr<const WindowPlan> plan_window(const Grid3& grid, const Window3& window) {
  const AttentionTuning tuning = attention_tuning();
  const std::int64_t max_queries = tuning.window_queries > 0 ? tuning.window_queries : kDefaultWindowQueries;
  const std::int64_t max_keys = tuning.window_keys > 0 ? tuning.window_keys : kDefaultWindowKeys;
  using Key = std::tuple<std::int64_t, std::int64_t, std::int64_t, std::array<std::int64_t, 3>,
                         std::array<std::int64_t, 3>, std::int64_t, std::int64_t>;
  static std::mutex mutex;
  static std::map<Key, std::shared_ptr<const WindowPlan>> cache;
  const Key key{grid.t, grid.h, grid.w, window.size, window.dilation, max_queries, max_keys};
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto plan = build_plan(grid, window, max_queries, max_keys);
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() > 64) cache.clear();
  cache.emplace(key, plan);
  return plan;
}

}  // namespace detail
}  // namespace vdit
