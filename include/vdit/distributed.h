// Processes working on one generation: the torchrun environment, a c10d process group (Gloo on
// CPUs, NCCL on GPUs when LibTorch was built with CUDA) and Ulysses sequence parallelism for the
// DiT. vdit carries no transport of its own: every byte goes through LibTorch's c10d.
//
// Ulysses (DeepSpeed-Ulysses, as xDiT and Wan2.1's multi-GPU mode): after patch embedding each of
// the W ranks keeps N/W tokens (the last shard padded so every shard has the same size). Blocks
// run on the shard; self-attention exchanges q, k, v by one all-to-all each so every rank holds
// all tokens of H/W heads, attends over the global grid (windows and processors see the same
// grid and global head indices as on one process), and a fourth all-to-all brings the output
// back to token shards. Cross-attention and the MLPs are per token and run on the shard; the
// head's output is gathered before unpatchify. Padded tokens are dropped before attention and
// after the gather, so they never reach a real token or the output.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace vdit {

// The torchrun variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. With none of
// them set the job is one process (rank 0 of 1).
struct DistributedEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  bool from_env = false;  // WORLD_SIZE was set
};
// Reads the environment; a malformed or inconsistent value (RANK >= WORLD_SIZE, a port out of
// range, WORLD_SIZE without MASTER_ADDR/MASTER_PORT) throws InputError naming the variable.
DistributedEnv read_distributed_env();

// The c10d timeout: --dist-timeout seconds, else VDIT_DIST_TIMEOUT, else 300 s. A collective or
// the rendezvous waiting longer for a peer fails with an error naming this rank and the cause.
std::chrono::milliseconds distributed_timeout(double seconds_or_negative = -1);

// Bytes this process moved through collectives (sent + received payload, its own share
// excluded), and how many calls, since the last reset.
struct CommCounters {
  std::int64_t all_to_all_calls = 0, all_to_all_bytes = 0;
  std::int64_t all_gather_calls = 0, all_gather_bytes = 0;
  std::int64_t broadcast_calls = 0, broadcast_bytes = 0;
};

// A process group. The one-process group does no communication (every collective is the
// identity), so code written against it runs unchanged without a job.
class DistributedGroup {
 public:
  // One process (no c10d).
  static std::shared_ptr<DistributedGroup> single();
  // Rendezvous through a TCPStore at MASTER_ADDR:MASTER_PORT (rank 0 serves it), then a Gloo
  // group (NCCL when `device` is CUDA and the build has it). A world of 1 returns single().
  static std::shared_ptr<DistributedGroup> create(const DistributedEnv& env, std::chrono::milliseconds timeout,
                                                  at::Device device = at::kCPU);
  virtual ~DistributedGroup() = default;

  int rank() const { return rank_; }
  int world_size() const { return world_; }
  bool is_main() const { return rank_ == 0; }
  const char* backend() const { return backend_; }

  // input [W * n, ...] contiguous: chunk j goes to rank j; returns [W * n, ...] whose chunk i
  // came from rank i.
  virtual at::Tensor all_to_all(const at::Tensor& input) = 0;
  // Every rank's `input` (same shape everywhere), stacked: [W, ...].
  virtual at::Tensor all_gather(const at::Tensor& input) = 0;
  // `tensor` (same shape and dtype on every rank) takes root's values, in place.
  virtual void broadcast(at::Tensor& tensor, int root = 0) = 0;
  virtual void barrier() = 0;

  const CommCounters& counters() const { return counters_; }
  void reset_counters() { counters_ = CommCounters{}; }

 protected:
  DistributedGroup(int rank, int world, const char* backend) : rank_(rank), world_(world), backend_(backend) {}
  int rank_, world_;
  const char* backend_;
  CommCounters counters_;
};

// Broadcasts a list of tensors of any shapes from root (the text encoder's outputs): shapes first,
// then the values. On other ranks `tensors` is replaced; every result is contiguous f32 on `device`.
void broadcast_tensors(DistributedGroup& group, std::vector<at::Tensor>& tensors, at::Device device, int root = 0);

// The world sizes that divide `heads` (for the error refusing the others).
std::vector<int> world_sizes_dividing(std::int64_t heads);
// InputError naming the working sizes when `world` does not divide `heads`.
void check_ulysses_heads(std::int64_t heads, int world);

// Ulysses over a group, as the DiT uses it (DiTCall::sequence_parallel).
class SequenceParallel {
 public:
  explicit SequenceParallel(std::shared_ptr<DistributedGroup> group);
  DistributedGroup& group() const { return *group_; }
  int world_size() const { return group_->world_size(); }
  int rank() const { return group_->rank(); }

  // Tokens per shard for a sequence of n: ceil(n / W); the padded length is W times that.
  std::int64_t shard_size(std::int64_t n) const;
  // This rank's tokens of x [B, N, ...] (zero rows past N): [B, shard_size(N), ...].
  at::Tensor shard_tokens(const at::Tensor& x) const;
  // Every rank's shard [B, s, ...] gathered and the padding dropped: [B, n, ...].
  at::Tensor gather_tokens(const at::Tensor& shard, std::int64_t n) const;
  // [B, H, s, D] (this rank's tokens, all heads) -> [B, H/W, n, D] (all n real tokens, this
  // rank's heads, which are global heads rank * H/W ...).
  at::Tensor tokens_to_heads(const at::Tensor& x, std::int64_t n) const;
  // The inverse: [B, H/W, n, D] -> [B, H, s, D] with s = shard_size(n).
  at::Tensor heads_to_tokens(const at::Tensor& x, std::int64_t n) const;

 private:
  std::shared_ptr<DistributedGroup> group_;
};

// Bytes one rank sends (and receives) per DiT forward under Ulysses, the analytic count: per
// self-attention layer 4 all-to-alls (q, k, v, o) of the local [B, H, s, D] tensor, of which the
// (W-1)/W that leave the rank; plus the gather of the head output. s = ceil(N / W).
struct UlyssesTraffic {
  std::int64_t attention_bytes = 0, gather_bytes = 0;
  std::int64_t total() const { return attention_bytes + gather_bytes; }
};
UlyssesTraffic ulysses_traffic(std::int64_t batch, std::int64_t tokens, std::int64_t heads, std::int64_t head_dim,
                               std::int64_t layers, std::int64_t head_features, int world, std::int64_t attention_element_bytes);

}  // namespace vdit
