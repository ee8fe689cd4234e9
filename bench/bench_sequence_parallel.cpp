// Ulysses sequence parallelism on this machine: for each world size, the bytes one rank sends per
// DiT forward (counted at the c10d calls) against the analytic count, and the time per forward
// (one sampling step with batched CFG: batch 2), every rank on one thread. The bench spawns its
// own ranks (itself, with the torchrun variables) over Gloo on 127.0.0.1.
//
// Usage: bench_sequence_parallel [--worlds 1,2] [--grid T,H,W] [--batch 2] [--repeats 3]
//        [--model DIR (a transformer folder: config.json + weights; default the demo model)
//         | --random DIM,HEADS,LAYERS,FFN (random weights)]
#include "vdit/common.h"
#include "vdit/distributed.h"
#include "vdit/io/checkpoint.h"
#include "vdit/models/wan_dit.h"

#include <ATen/CPUGeneratorImpl.h>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::vector<std::int64_t> parse_list(const std::string& s) {
  std::vector<std::int64_t> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) out.push_back(std::stoll(item));
  return out;
}

struct Options {
  std::vector<std::int64_t> worlds{1, 2};
  std::vector<std::int64_t> grid{5, 16, 16};
  std::int64_t batch = 2, repeats = 3;
  std::string model = std::string(VDIT_SOURCE_DIR) + "/models/shapes/transformer";
  std::vector<std::int64_t> random;  // dim, heads, layers, ffn
};

// One rank: prints "RESULT world bytes analytic seconds" on rank 0.
int run_rank(const Options& o) {
  using namespace vdit;
  set_threads(1);
  c10::InferenceMode guard;
  const DistributedEnv env = read_distributed_env();
  auto group = DistributedGroup::create(env, std::chrono::seconds(120));
  WanDiTConfig config;
  if (o.random.empty()) {
    config = WanDiTConfig::from_file(o.model + "/config.json");
  } else {
    config.dim = o.random[0];
    config.num_heads = o.random[1];
    config.num_layers = o.random[2];
    config.ffn_dim = o.random[3];
    config.text_dim = 64;
    config.text_len = 16;
    config.freq_dim = 64;
  }
  WanDiT dit(config);
  if (o.random.empty()) {
    load_wan_dit_weights(dit, {WeightFile::open(o.model + "/diffusion_pytorch_model.safetensors")}, at::kFloat);
  } else {
    at::manual_seed(0);
    dit->reset_parameters();
  }
  dit->eval();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  const auto& p = config.patch_size;
  const at::Tensor x = at::randn({o.batch, config.in_dim, o.grid[0] * p[0], o.grid[1] * p[1], o.grid[2] * p[2]}, gen);
  const at::Tensor t = at::full({o.batch}, 500.0f);
  const WanTextCondition cond = dit->encode_text(at::randn({o.batch, 8, config.text_dim}, gen));
  SequenceParallel sp(group);
  DiTCall call;
  call.sequence_parallel = &sp;
  dit->forward(x, t, cond, call);  // warm-up
  group->barrier();
  group->reset_counters();
  const auto t0 = std::chrono::steady_clock::now();
  const std::clock_t cpu0 = std::clock();
  for (std::int64_t i = 0; i < o.repeats; ++i) dit->forward(x, t, cond, call);
  // CPU time of this rank (compute and Gloo's threads): on a shared machine the wall time
  // depends on what else runs, this does much less.
  const double cpu = static_cast<double>(std::clock() - cpu0) / CLOCKS_PER_SEC / static_cast<double>(o.repeats);
  group->barrier();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / static_cast<double>(o.repeats);
  const auto& c = group->counters();
  const std::int64_t bytes = (c.all_to_all_bytes + c.all_gather_bytes) / o.repeats;
  const std::int64_t tokens = o.grid[0] * o.grid[1] * o.grid[2];
  const UlyssesTraffic analytic = ulysses_traffic(o.batch, tokens, config.num_heads, config.head_dim(), config.num_layers,
                                                  config.patch_volume() * config.out_dim, group->world_size(), 4);
  if (group->is_main()) {
    std::printf("RESULT %d %lld %lld %lld %lld %.6f %.6f\n", group->world_size(), static_cast<long long>(bytes),
                static_cast<long long>(analytic.total()), static_cast<long long>(c.all_to_all_calls / o.repeats),
                static_cast<long long>(tokens), seconds, cpu);
  }
  return 0;
}

std::string self_exe() {
  std::vector<char> buf(4096);
  const ssize_t n = ::readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  return std::string(buf.data(), static_cast<std::size_t>(n > 0 ? n : 0));
}

}  // namespace

int main(int argc, char** argv) {
  vdit::configure_blas(argv);
  Options o;
  std::vector<std::string> passthrough;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has = i + 1 < argc;
    if (a == "--worlds" && has) o.worlds = parse_list(argv[++i]);
    else if (a == "--grid" && has) o.grid = parse_list(argv[++i]);
    else if (a == "--batch" && has) o.batch = std::stoll(argv[++i]);
    else if (a == "--repeats" && has) o.repeats = std::stoll(argv[++i]);
    else if (a == "--model" && has) o.model = argv[++i];
    else if (a == "--random" && has) o.random = parse_list(argv[++i]);
    else {
      std::cerr << "usage: bench_sequence_parallel [--worlds 1,2] [--grid T,H,W] [--batch 2] [--repeats 3] [--model DIR | --random DIM,HEADS,LAYERS,FFN]\n";
      return 2;
    }
    if (a != "--worlds") passthrough.insert(passthrough.end(), {a, argv[i]});
  }
  if (o.grid.size() != 3 || (!o.random.empty() && o.random.size() != 4)) {
    std::cerr << "bench_sequence_parallel: --grid needs T,H,W and --random DIM,HEADS,LAYERS,FFN\n";
    return 2;
  }
  try {
    if (std::getenv("WORLD_SIZE")) return run_rank(o);

    // Parent: each world size as a job of this program's ranks; rank 0's RESULT line read back.
    const std::string exe = self_exe();
    std::printf("Ulysses, one thread per rank, batch %lld, token grid %lldx%lldx%lld, %s\n", static_cast<long long>(o.batch),
                static_cast<long long>(o.grid[0]), static_cast<long long>(o.grid[1]), static_cast<long long>(o.grid[2]),
                o.random.empty() ? o.model.c_str() : "random weights");
    std::printf("%6s %8s %16s %16s %12s %12s %10s %16s\n", "ranks", "tokens", "bytes/forward", "analytic", "all-to-alls",
                "s/forward", "speedup", "rank-0 cpu s/fwd");
    double base = 0;
    for (std::int64_t world : o.worlds) {
      const std::string out_path = "/tmp/bench_sp_" + std::to_string(::getpid()) + "_" + std::to_string(world) + ".txt";
      const int port = 20000 + static_cast<int>((::getpid() * 7 + world) % 20000);
      std::vector<pid_t> pids;
      std::fflush(stdout);  // a child must not inherit (and flush) this buffer
      for (std::int64_t r = 0; r < world; ++r) {
        const pid_t pid = ::fork();
        if (pid == 0) {
          ::setenv("RANK", std::to_string(r).c_str(), 1);
          ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
          ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
          ::setenv("MASTER_ADDR", "127.0.0.1", 1);
          ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
          if (r == 0 && !std::freopen(out_path.c_str(), "w", stdout)) ::_exit(126);
          std::vector<char*> args{const_cast<char*>(exe.c_str())};
          for (auto& s : passthrough) args.push_back(const_cast<char*>(s.c_str()));
          args.push_back(nullptr);
          ::execv(exe.c_str(), args.data());
          ::_exit(127);
        }
        pids.push_back(pid);
      }
      int failed = 0;
      for (pid_t pid : pids) {
        int status = 0;
        ::waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) failed = 1;
      }
      std::ifstream in(out_path);
      std::string tag;
      long long w = 0, bytes = 0, analytic = 0, calls = 0, tokens = 0;
      double seconds = 0, cpu = 0;
      in >> tag >> w >> bytes >> analytic >> calls >> tokens >> seconds >> cpu;
      std::remove(out_path.c_str());
      if (failed || tag != "RESULT") {
        std::cerr << "bench_sequence_parallel: the " << world << "-rank job failed\n";
        return 1;
      }
      if (world == o.worlds.front()) base = seconds;
      std::printf("%6lld %8lld %16lld %16lld %12lld %12.4f %10.2f %16.4f\n", w, tokens, bytes, analytic, calls, seconds,
                  base / seconds, cpu);
    }
  } catch (const std::exception& e) {
    std::cerr << "bench_sequence_parallel: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
