// The torchrun environment, c10d process groups (Gloo; NCCL on a CUDA LibTorch) and Ulysses.
// See include/vdit/distributed.h.
#include "vdit/distributed.h"

#include "vdit/common.h"

#if defined(VDIT_WITH_GLOO)
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif
#if defined(VDIT_WITH_NCCL)
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL 1
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <c10/core/InferenceMode.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <string>

namespace vdit {

namespace {

// A whole decimal integer in [lo, hi], else InputError naming the variable.
int env_int(const char* name, const char* value, long lo, long hi) {
  errno = 0;
  char* end = nullptr;
  const long v = std::strtol(value, &end, 10);
  if (errno != 0 || end == value || *end != '\0' || v < lo || v > hi) {
    throw InputError(std::string("environment variable ") + name + "='" + value + "' must be an integer in [" +
                     std::to_string(lo) + ", " + std::to_string(hi) + "]");
  }
  return static_cast<int>(v);
}

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

// The first line of an exception's message.
std::string first_line(const std::string& what) { return what.substr(0, what.find('\n')); }

class SingleProcessGroup final : public DistributedGroup {
 public:
  SingleProcessGroup() : DistributedGroup(0, 1, "none") {}
  at::Tensor all_to_all(const at::Tensor& input) override { return input; }
  at::Tensor all_gather(const at::Tensor& input) override { return input.unsqueeze(0); }
  void broadcast(at::Tensor&, int) override {}
  void barrier() override {}
};

#if defined(VDIT_WITH_GLOO) || defined(VDIT_WITH_NCCL)

// Gloo moves f32/f64/f16 and integers; bf16 travels as f16 bit patterns (no arithmetic is done on
// the values, so the bits arrive unchanged).
at::Tensor wire_view(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 ? t.view(at::kHalf) : t; }

// Gloo writes results from its own worker threads, where InferenceMode is off: a buffer it
// writes must be a normal tensor even when the caller runs under InferenceMode.
at::Tensor normal_empty_like(const at::Tensor& t) {
  c10::InferenceMode normal(false);
  return at::empty(t.sizes(), t.options());
}

std::int64_t tensor_bytes(const at::Tensor& t) { return t.numel() * static_cast<std::int64_t>(t.element_size()); }

class C10dGroup final : public DistributedGroup {
 public:
  C10dGroup(int rank, int world, const char* backend, c10::intrusive_ptr<c10d::Store> store,
            c10::intrusive_ptr<c10d::ProcessGroup> pg, std::chrono::milliseconds timeout)
      : DistributedGroup(rank, world, backend), store_(std::move(store)), pg_(std::move(pg)), timeout_(timeout) {}

  at::Tensor all_to_all(const at::Tensor& input) override {
    if (input.size(0) % world_ != 0)
      throw RuntimeError("all_to_all: leading dim " + std::to_string(input.size(0)) + " is not a multiple of the world size");
    at::Tensor in = wire_view(input.contiguous());
    at::Tensor out = normal_empty_like(in);
    std::vector<std::int64_t> equal;  // empty: equal splits
    wait("all_to_all", [&] { return pg_->alltoall_base(out, in, equal, equal); });
    counters_.all_to_all_calls += 1;
    counters_.all_to_all_bytes += tensor_bytes(in) / world_ * (world_ - 1);
    return input.scalar_type() == at::kBFloat16 ? out.view(at::kBFloat16) : out;
  }

  at::Tensor all_gather(const at::Tensor& input) override {
    at::Tensor in = wire_view(input.contiguous());
    std::vector<at::Tensor> inputs{in};
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < world_; ++r) outputs[0].push_back(normal_empty_like(in));
    wait("all_gather", [&] { return pg_->allgather(outputs, inputs); });
    counters_.all_gather_calls += 1;
    counters_.all_gather_bytes += tensor_bytes(in) * (world_ - 1);
    at::Tensor out = at::stack(outputs[0]);
    return input.scalar_type() == at::kBFloat16 ? out.view(at::kBFloat16) : out;
  }

  void broadcast(at::Tensor& tensor, int root) override {
    at::Tensor buffer = normal_empty_like(tensor);
    buffer.copy_(tensor);
    std::vector<at::Tensor> tensors{wire_view(buffer)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    wait("broadcast", [&] { return pg_->broadcast(tensors, opts); });
    tensor = buffer;
    counters_.broadcast_calls += 1;
    if (rank_ == root) counters_.broadcast_bytes += tensor_bytes(tensor) * (world_ - 1);
  }

  void barrier() override {
    wait("barrier", [&] { return pg_->barrier(); });
  }

 private:
  // Runs one collective and waits for it; a peer that died or stopped answering within the
  // timeout becomes one line naming this rank, the operation and the transport's reason.
  template <typename Start>
  void wait(const char* op, Start&& start) {
    try {
      auto work = start();
      work->wait(timeout_);
    } catch (const c10::Error& e) {
      throw RuntimeError(failure(op, e.what_without_backtrace()));
    } catch (const std::exception& e) {
      throw RuntimeError(failure(op, e.what()));
    }
  }

  std::string failure(const char* op, const std::string& what) const {
    return "rank " + std::to_string(rank_) + " of " + std::to_string(world_) + ": " + op + " failed (c10d timeout " +
           std::to_string(timeout_.count() / 1000) + " s): " + first_line(what);
  }

  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  std::chrono::milliseconds timeout_;
};

#endif

}  // namespace

DistributedEnv read_distributed_env() {
  DistributedEnv e;
  const char* world = env("WORLD_SIZE");
  if (!world) {
    if (env("RANK") && env_int("RANK", env("RANK"), 0, 1 << 20) != 0)
      throw InputError("environment variable RANK is set but WORLD_SIZE is not");
    return e;
  }
  e.from_env = true;
  e.world_size = env_int("WORLD_SIZE", world, 1, 1 << 20);
  e.rank = env("RANK") ? env_int("RANK", env("RANK"), 0, 1 << 20) : 0;
  if (e.rank >= e.world_size)
    throw InputError("environment variable RANK=" + std::to_string(e.rank) + " must be below WORLD_SIZE=" +
                     std::to_string(e.world_size));
  e.local_rank = env("LOCAL_RANK") ? env_int("LOCAL_RANK", env("LOCAL_RANK"), 0, 1 << 20) : e.rank;
  if (e.world_size > 1) {
    if (!env("MASTER_ADDR") || !env("MASTER_PORT"))
      throw InputError("WORLD_SIZE=" + std::to_string(e.world_size) +
                       " needs MASTER_ADDR and MASTER_PORT (as torchrun or vdit launch set them)");
  }
  if (env("MASTER_ADDR")) e.master_addr = env("MASTER_ADDR");
  if (env("MASTER_PORT")) e.master_port = env_int("MASTER_PORT", env("MASTER_PORT"), 1, 65535);
  return e;
}

std::chrono::milliseconds distributed_timeout(double seconds) {
  if (seconds < 0) {
    if (const char* v = env("VDIT_DIST_TIMEOUT")) {
      char* end = nullptr;
      seconds = std::strtod(v, &end);
      if (end == v || *end != '\0' || !std::isfinite(seconds) || seconds <= 0)
        throw InputError(std::string("environment variable VDIT_DIST_TIMEOUT='") + v + "' must be a positive number of seconds");
    } else {
      seconds = 300;
    }
  }
  if (!(seconds > 0) || !std::isfinite(seconds) || seconds > 1e7)
    throw InputError("--dist-timeout must be a positive number of seconds (at most 1e7)");
  return std::chrono::milliseconds(static_cast<std::int64_t>(std::ceil(seconds * 1000.0)));
}

std::shared_ptr<DistributedGroup> DistributedGroup::single() { return std::make_shared<SingleProcessGroup>(); }

std::shared_ptr<DistributedGroup> DistributedGroup::create(const DistributedEnv& env_, std::chrono::milliseconds timeout,
                                                           at::Device device) {
  if (env_.world_size <= 1) return single();
#if defined(VDIT_WITH_GLOO) || defined(VDIT_WITH_NCCL)
  const std::string where = env_.master_addr + ":" + std::to_string(env_.master_port);
  c10::intrusive_ptr<c10d::Store> store;
  try {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(env_.master_port);
    opts.isServer = env_.rank == 0;
    opts.numWorkers = static_cast<std::size_t>(env_.world_size);
    opts.waitWorkers = true;
    opts.timeout = timeout;
    store = c10::make_intrusive<c10d::TCPStore>(env_.master_addr, opts);
  } catch (const std::exception& e) {
    throw RuntimeError("rank " + std::to_string(env_.rank) + " of " + std::to_string(env_.world_size) +
                       ": rendezvous at " + where + " failed: " + first_line(e.what()));
  }
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>("vdit", store);
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  const char* backend = "gloo";
  try {
#if defined(VDIT_WITH_NCCL)
    if (device.is_cuda()) {
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, env_.rank, env_.world_size, opts);
      backend = "nccl";
    }
#endif
#if defined(VDIT_WITH_GLOO)
    if (!pg) {
      if (device.is_cuda())
        throw InputError("this LibTorch has no NCCL: sequence parallelism on CUDA needs a CUDA LibTorch built with NCCL");
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      // Gloo's own interface choice: GLOO_SOCKET_IFNAME when set (as in PyTorch); a loopback
      // master means one machine; otherwise the interface this host name resolves to.
      if (const char* ifname = env("GLOO_SOCKET_IFNAME")) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else if (env_.master_addr == "localhost" || env_.master_addr.rfind("127.", 0) == 0) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      opts->threads = 2;
      pg = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, env_.rank, env_.world_size, opts);
    }
#endif
    if (!pg) throw InputError("this build has no c10d backend for device " + device.str());
  } catch (const InputError&) {
    throw;
  } catch (const std::exception& e) {
    throw RuntimeError("rank " + std::to_string(env_.rank) + " of " + std::to_string(env_.world_size) + ": " + backend +
                       " process group at " + where + " failed: " + first_line(e.what()));
  }
  return std::make_shared<C10dGroup>(env_.rank, env_.world_size, backend, store, pg, timeout);
#else
  (void)timeout;
  (void)device;
  throw InputError("WORLD_SIZE=" + std::to_string(env_.world_size) +
                   ": this vdit was built without c10d Gloo headers (install libgloo-dev, or use a LibTorch that ships "
                   "them, and rebuild)");
#endif
}

void broadcast_tensors(DistributedGroup& group, std::vector<at::Tensor>& tensors, at::Device device, int root) {
  if (group.world_size() == 1) return;
  const bool sender = group.rank() == root;
  // Header: count, then each tensor's rank and sizes (at most 8 dims).
  constexpr std::int64_t kMaxDims = 8;
  at::Tensor count = at::full({1}, sender ? static_cast<std::int64_t>(tensors.size()) : 0, at::kLong);
  group.broadcast(count, root);
  const std::int64_t n = count.item<std::int64_t>();
  at::Tensor shapes = at::zeros({n, kMaxDims + 1}, at::kLong);
  if (sender) {
    for (std::int64_t i = 0; i < n; ++i) {
      const at::Tensor& t = tensors[static_cast<std::size_t>(i)];
      if (t.dim() > kMaxDims) throw RuntimeError("broadcast_tensors: more than 8 dims");
      shapes[i][0] = t.dim();
      for (std::int64_t d = 0; d < t.dim(); ++d) shapes[i][d + 1] = t.size(d);
    }
  }
  group.broadcast(shapes, root);
  std::vector<at::Tensor> out;
  for (std::int64_t i = 0; i < n; ++i) {
    std::vector<std::int64_t> sizes;
    for (std::int64_t d = 0; d < shapes[i][0].item<std::int64_t>(); ++d) sizes.push_back(shapes[i][d + 1].item<std::int64_t>());
    at::Tensor t = sender ? tensors[static_cast<std::size_t>(i)].to(at::kCPU, at::kFloat).contiguous()
                          : at::empty(sizes, at::kFloat);
    group.broadcast(t, root);
    out.push_back(t.to(device));
  }
  tensors = std::move(out);
}

std::vector<int> world_sizes_dividing(std::int64_t heads) {
  std::vector<int> out;
  for (std::int64_t w = 1; w <= heads; ++w)
    if (heads % w == 0) out.push_back(static_cast<int>(w));
  return out;
}

void check_ulysses_heads(std::int64_t heads, int world) {
  if (world <= 1 || heads % world == 0) return;
  std::string sizes;
  for (int w : world_sizes_dividing(heads)) sizes += (sizes.empty() ? "" : ", ") + std::to_string(w);
  throw InputError("sequence parallelism (Ulysses) splits the DiT's " + std::to_string(heads) + " heads across " +
                   std::to_string(world) + " processes, which does not divide them; world sizes that work: " + sizes);
}

SequenceParallel::SequenceParallel(std::shared_ptr<DistributedGroup> group) : group_(std::move(group)) {
  if (!group_) throw RuntimeError("SequenceParallel: null group");
}

std::int64_t SequenceParallel::shard_size(std::int64_t n) const {
  const std::int64_t w = world_size();
  return (n + w - 1) / w;
}

at::Tensor SequenceParallel::shard_tokens(const at::Tensor& x) const {
  const std::int64_t n = x.size(1), s = shard_size(n), padded = s * world_size();
  at::Tensor full = x;
  if (padded > n) {
    std::vector<std::int64_t> shape = x.sizes().vec();
    shape[1] = padded - n;
    full = at::cat({x, at::zeros(shape, x.options())}, 1);
  }
  return full.narrow(1, rank() * s, s).contiguous();
}

at::Tensor SequenceParallel::gather_tokens(const at::Tensor& shard, std::int64_t n) const {
  // [W, B, s, ...] -> [B, W * s, ...], then the padding dropped.
  at::Tensor all = group_->all_gather(shard);
  std::vector<std::int64_t> perm{1, 0};
  for (std::int64_t d = 2; d < all.dim(); ++d) perm.push_back(d);
  std::vector<std::int64_t> shape = shard.sizes().vec();
  shape[1] = shard.size(1) * world_size();
  return all.permute(perm).reshape(shape).narrow(1, 0, n);
}

at::Tensor SequenceParallel::tokens_to_heads(const at::Tensor& x, std::int64_t n) const {
  const std::int64_t W = world_size(), B = x.size(0), H = x.size(1), s = x.size(2), D = x.size(3);
  // Send chunk j = heads [j H/W, (j+1) H/W) of my tokens to rank j.
  const at::Tensor send = x.reshape({B, W, H / W, s, D}).permute({1, 0, 2, 3, 4}).contiguous();
  // Chunk i received = my heads of rank i's tokens; token order i*s .. is the global order.
  const at::Tensor recv = group_->all_to_all(send.view({W * B, H / W, s, D})).view({W, B, H / W, s, D});
  return recv.permute({1, 2, 0, 3, 4}).reshape({B, H / W, W * s, D}).narrow(2, 0, n);
}

at::Tensor SequenceParallel::heads_to_tokens(const at::Tensor& x, std::int64_t n) const {
  const std::int64_t W = world_size(), B = x.size(0), Hl = x.size(1), D = x.size(3);
  const std::int64_t s = shard_size(n);
  at::Tensor full = x;
  if (W * s > n) full = at::cat({x, at::zeros({B, Hl, W * s - n, D}, x.options())}, 2);
  // Send chunk j = my heads of rank j's tokens.
  const at::Tensor send = full.reshape({B, Hl, W, s, D}).permute({2, 0, 1, 3, 4}).contiguous();
  // Chunk i received = rank i's heads of my tokens.
  const at::Tensor recv = group_->all_to_all(send.view({W * B, Hl, s, D})).view({W, B, Hl, s, D});
  return recv.permute({1, 0, 2, 3, 4}).reshape({B, W * Hl, s, D});
}

UlyssesTraffic ulysses_traffic(std::int64_t batch, std::int64_t tokens, std::int64_t heads, std::int64_t head_dim,
                               std::int64_t layers, std::int64_t head_features, int world,
                               std::int64_t attention_element_bytes) {
  UlyssesTraffic t;
  if (world <= 1) return t;
  const std::int64_t s = (tokens + world - 1) / world;
  const std::int64_t local = batch * heads * s * head_dim * attention_element_bytes;  // one of q, k, v, o
  t.attention_bytes = layers * 4 * (local / world * (world - 1));
  t.gather_bytes = batch * s * head_features * 4 * (world - 1);  // the f32 head output
  return t;
}

}  // namespace vdit
