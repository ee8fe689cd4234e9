// Sequence parallelism (Ulysses on c10d Gloo): the all-to-all layout, the DiT on 2 and 4 ranks
// against one process, and whole `vdit generate` jobs of spawned processes (vdit launch and
// torchrun-style environments), including a rank killed mid-run.
#include <catch2/catch.hpp>

#include "cli_runner.h"
#include "tiny_models.h"

#include "vdit/attention/processors.h"
#include "vdit/common.h"
#include "vdit/distributed.h"
#include "vdit/io/safetensors.h"
#include "vdit/models/wan_dit.h"

#include <ATen/CPUGeneratorImpl.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <thread>

using namespace vdit;
namespace fs = std::filesystem;

namespace {

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const int port = ntohs(addr.sin_port);
  ::close(fd);
  return port;
}

// Runs fn(group) on `world` ranks, one thread each, joined through a real TCPStore and Gloo
// group (the same code a process per rank runs); returns each rank's result.
std::vector<at::Tensor> on_ranks(int world, const std::function<at::Tensor(const std::shared_ptr<DistributedGroup>&)>& fn) {
  const int port = free_port();
  std::vector<at::Tensor> out(static_cast<std::size_t>(world));
  std::vector<std::string> errors(static_cast<std::size_t>(world));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        c10::InferenceMode guard;
        DistributedEnv env;
        env.rank = r;
        env.world_size = world;
        env.master_port = port;
        auto group = DistributedGroup::create(env, std::chrono::seconds(60));
        out[static_cast<std::size_t>(r)] = fn(group);
        group->barrier();
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  std::string all;
  for (int r = 0; r < world; ++r) all += "rank " + std::to_string(r) + ": " + errors[static_cast<std::size_t>(r)] + "\n";
  INFO(all);
  for (const auto& e : errors) REQUIRE(e.empty());
  return out;
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

std::string read_all(const fs::path& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

fs::path temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("vdit-sp-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

at::Tensor latents_of(const fs::path& path) { return SafetensorsFile::open(path.string())->tensor("latents"); }

}  // namespace

TEST_CASE("Ulysses all-to-all: tokens to heads and back, with a padded shard", "[sp]") {
  // 7 tokens on 2 ranks: shards of 4, the last with one padding row.
  const std::int64_t B = 2, H = 4, N = 7, D = 3;
  at::Tensor global = at::arange(B * N * H * D, at::kFloat).reshape({B, N, H, D});
  auto results = on_ranks(2, [&](const std::shared_ptr<DistributedGroup>& group) {
    SequenceParallel sp(group);
    const at::Tensor shard = sp.shard_tokens(global);  // [B, 4, H, D]
    CHECK(shard.size(1) == 4);
    const at::Tensor local = shard.transpose(1, 2).contiguous();  // [B, H, 4, D]
    group->reset_counters();
    const at::Tensor heads = sp.tokens_to_heads(local, N);  // [B, H/2, N, D]
    // This rank's heads, every real token, in global order.
    const at::Tensor expected = global.transpose(1, 2).narrow(1, sp.rank() * 2, 2);
    CHECK(at::equal(heads, expected));
    const at::Tensor back = sp.heads_to_tokens(heads, N);
    CHECK(at::equal(back, local));  // the padded row comes back as zeros, as shard_tokens made it
    CHECK(at::equal(sp.gather_tokens(shard, N), global));
    // One all-to-all sends half of the local tensor (the other half stays).
    CHECK(group->counters().all_to_all_calls == 2);
    CHECK(group->counters().all_to_all_bytes == 2 * local.numel() * 4 / 2);
    return back;
  });
  CHECK(at::equal(results[1].select(2, 3), at::zeros({B, H, D})));  // rank 1's padding row
}

TEST_CASE("Ulysses: head counts the world does not divide are refused naming the sizes that work", "[sp]") {
  CHECK_NOTHROW(check_ulysses_heads(12, 4));
  try {
    check_ulysses_heads(12, 5);
    FAIL("no error");
  } catch (const InputError& e) {
    CHECK(std::string(e.what()).find("world sizes that work: 1, 2, 3, 4, 6, 12") != std::string::npos);
  }
}

TEST_CASE("torchrun environment: absent is one process, malformed values are one-line errors", "[sp]") {
  for (const char* v : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}) ::unsetenv(v);
  DistributedEnv env = read_distributed_env();
  CHECK(env.world_size == 1);
  CHECK(!env.from_env);
  ::setenv("WORLD_SIZE", "2", 1);
  ::setenv("RANK", "2", 1);
  ::setenv("MASTER_ADDR", "127.0.0.1", 1);
  ::setenv("MASTER_PORT", "29500", 1);
  CHECK_THROWS_AS(read_distributed_env(), InputError);  // RANK >= WORLD_SIZE
  ::setenv("RANK", "1", 1);
  ::setenv("MASTER_PORT", "70000", 1);
  CHECK_THROWS_AS(read_distributed_env(), InputError);
  ::setenv("MASTER_PORT", "29501", 1);
  env = read_distributed_env();
  CHECK((env.rank == 1 && env.world_size == 2 && env.local_rank == 1 && env.master_port == 29501));
  for (const char* v : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}) ::unsetenv(v);
  CHECK_THROWS_AS(distributed_timeout(0), InputError);
  CHECK(distributed_timeout(2.5) == std::chrono::milliseconds(2500));
}

TEST_CASE("Ulysses DiT on 2 ranks equals one process: odd token count, PAG heads, windowed attention", "[sp]") {
  WanDiT dit = vdit_test::load_tiny_dit();  // 2 heads
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  // Grid 3 x 3 x 3 = 27 tokens: shards of 14, one padding row on rank 1.
  const at::Tensor x = at::randn({2, 16, 3, 6, 6}, gen);
  const at::Tensor t = at::tensor({700.0f, 300.0f});
  const at::Tensor context = at::randn({2, 5, 32}, gen);
  // PAG's perturbation on global head 1 of layer 0 (it lives on rank 1) for row 1 only.
  auto pag = std::make_shared<HeadPerturbation>();
  pag->set_weight(0, 1, 1.0);
  pag->set_roles({RowRole::Perturbed});
  AttentionProcessors processors;
  processors.set(AttentionKind::Self, pag);

  struct Case {
    const char* name;
    std::optional<Window3> window;
    bool perturb;
  };
  for (const Case& c : {Case{"full", std::nullopt, false}, Case{"pag", std::nullopt, true},
                        Case{"window", Window3{{3, 3, 3}, {1, 1, 1}}, false}}) {
    SECTION(c.name) {
      DiTCall base;
      base.self_attn_window = c.window;
      if (c.perturb) {
        base.processors = &processors;
        base.row_roles = {RowRole::Cond, RowRole::Perturbed};
      }
      at::Tensor reference;
      {
        c10::InferenceMode guard;
        reference = dit->forward(x, t, dit->encode_text(context), base);
      }
      auto results = on_ranks(2, [&](const std::shared_ptr<DistributedGroup>& group) {
        SequenceParallel sp(group);
        DiTCall call = base;
        call.sequence_parallel = &sp;
        return dit->forward(x, t, dit->encode_text(context), call);
      });
      for (const auto& r : results) {
        REQUIRE(r.sizes() == reference.sizes());
        CHECK(max_abs_diff(r, reference) < 1e-5);
      }
      CHECK(at::equal(results[0], results[1]));  // every rank holds the same gathered output
      if (c.perturb) {
        // The perturbation acted (the perturbed row differs from a plain forward of it).
        c10::InferenceMode guard;
        const at::Tensor plain = dit->forward(x, t, dit->encode_text(context));
        CHECK(max_abs_diff(plain.select(0, 1), reference.select(0, 1)) > 1e-4);
      }
    }
  }
}

TEST_CASE("Ulysses DiT on 4 ranks (demo model, 4 heads) equals one process", "[sp]") {
  const std::string dir = std::string(VDIT_SOURCE_DIR) + "/models/shapes/transformer";
  WanDiT dit(WanDiTConfig::from_file(dir + "/config.json"));
  load_wan_dit_weights(dit, {WeightFile::open(dir + "/diffusion_pytorch_model.safetensors")}, at::kFloat);
  dit->eval();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(9);
  const at::Tensor x = at::randn({1, 16, 3, 10, 6}, gen);  // 3 x 5 x 3 = 45 tokens: shards of 12, 3 padding rows
  const at::Tensor t = at::tensor({500.0f});
  const at::Tensor context = at::randn({1, 6, 64}, gen);
  at::Tensor reference;
  {
    c10::InferenceMode guard;
    reference = dit->forward(x, t, dit->encode_text(context));
  }
  for (int world : {2, 4}) {
    auto results = on_ranks(world, [&](const std::shared_ptr<DistributedGroup>& group) {
      SequenceParallel sp(group);
      DiTCall call;
      call.sequence_parallel = &sp;
      group->reset_counters();
      at::Tensor out = dit->forward(x, t, dit->encode_text(context), call);
      // Bytes sent by this rank: the analytic Ulysses count, exactly.
      const UlyssesTraffic expected = ulysses_traffic(1, 45, 4, 32, 4, 64, world, 4);
      CHECK(group->counters().all_to_all_bytes == expected.attention_bytes);
      CHECK(group->counters().all_gather_bytes == expected.gather_bytes);
      CHECK(group->counters().all_to_all_calls == 4 * 4);
      return out;
    });
    for (const auto& r : results) CHECK(max_abs_diff(r, reference) < 1e-5);
  }
}

// ------------------------------------------------------------------------------------------
// Whole jobs of spawned processes.

TEST_CASE("vdit launch --nproc 2 generate equals one process within 1e-5 (wan-tiny, odd token count)", "[sp][cli]") {
  const fs::path root = temp_dir("launch");
  const fs::path model = vdit_test::make_tiny_model(root / "model", "diffusers");
  // 48x48, 9 frames: a 3 x 3 x 3 token grid (27 tokens, one padding row on rank 1).
  const std::string args = "generate -m " + model.string() +
                           " -p 'a blue square' --size 48x48 --frames 9 --steps 3 --seed 3 --format png -o ";
  std::string out;
  REQUIRE(vdit_test::run_vdit("--quiet " + args + (root / "one").string() + " --save-latents " + (root / "one.safetensors").string(),
                              out) == 0);
  REQUIRE(vdit_test::run_vdit("launch --nproc 2 -- --threads 1 " + args + (root / "two").string() + " --save-latents " +
                                  (root / "two.safetensors").string(),
                              out) == 0);
  INFO(out);
  CHECK(out.find("sequence parallel: 2 ranks (gloo, Ulysses)") != std::string::npos);
  const at::Tensor one = latents_of(root / "one.safetensors"), two = latents_of(root / "two.safetensors");
  REQUIRE(one.sizes() == two.sizes());
  CHECK(max_abs_diff(one, two) < 1e-5);
  CHECK(fs::exists(root / "two" / "frame_00001.png"));
  fs::remove_all(root);
}

TEST_CASE("vdit launch: PAG heads on both ranks and long video under 2 ranks equal one process (demo model)", "[sp][cli]") {
  const fs::path root = temp_dir("demo");
  struct Run {
    const char* name;
    std::string args;
  };
  // Global head 1 lives on rank 0 and head 3 on rank 1; 17 frames is above the demo's trained 9.
  for (const Run& run : {Run{"pag", "--steps 4 --pag-scale 2 --pag-heads '1:1,3;2:0'"},
                         Run{"long", "--steps 3 --frames 17 --context-frames 9 --context-overlap 4"}}) {
    SECTION(run.name) {
      const std::string args = "generate -p 'a red circle moving right' --seed 2 " + run.args + " --format png -o ";
      std::string out;
      REQUIRE(vdit_test::run_vdit("--quiet " + args + (root / "one").string() + " --save-latents " +
                                      (root / "one.safetensors").string(),
                                  out) == 0);
      INFO(out);
      REQUIRE(vdit_test::run_vdit("launch --nproc 2 -- --threads 1 --quiet " + args + (root / "two").string() +
                                      " --save-latents " + (root / "two.safetensors").string(),
                                  out) == 0);
      const at::Tensor one = latents_of(root / "one.safetensors"), two = latents_of(root / "two.safetensors");
      REQUIRE(one.sizes() == two.sizes());
      CHECK(max_abs_diff(one, two) < 1e-5);
    }
  }
  fs::remove_all(root);
}

TEST_CASE("vdit launch: bad input exits 2 on every rank, heads the world does not divide are refused", "[sp][cli]") {
  std::string out;
  CHECK(vdit_test::run_vdit("launch --nproc 2 -- generate -p x --steps 0 -o /tmp/vdit-sp-never.png", out) == 2);
  CHECK(!fs::exists("/tmp/vdit-sp-never.png"));
  CHECK(vdit_test::run_vdit("launch --nproc 3 -- generate -p x --steps 2 -o /tmp/vdit-sp-never.png", out) == 2);
  CHECK(out.find("world sizes that work: 1, 2, 4") != std::string::npos);
  CHECK(vdit_test::run_vdit("launch --nproc 0 -- generate -p x", out) == 2);
  CHECK(vdit_test::run_vdit("launch --nproc 2", out) == 2);
}

namespace {

// One rank of a torchrun-style job: `vdit ARGS` with the torchrun variables, output to `log`.
pid_t spawn_rank(int rank, int world, int port, const std::vector<std::string>& args, const fs::path& log) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::setenv("RANK", std::to_string(rank).c_str(), 1);
    ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
    ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
    ::setenv("MASTER_ADDR", "127.0.0.1", 1);
    ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    std::vector<char*> argv{const_cast<char*>(VDIT_BINARY)};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(VDIT_BINARY, argv.data());
    ::_exit(127);
  }
  return pid;
}

// Waits up to `seconds` for `pid`; its exit code, 128+signal, or -1 when still running (then killed).
int wait_for(pid_t pid, double seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int>(seconds * 1000));
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid)
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  return -1;
}

bool wait_for_text(const fs::path& log, const std::string& text, double seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int>(seconds * 1000));
  while (std::chrono::steady_clock::now() < deadline) {
    if (read_all(log).find(text) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

}  // namespace

TEST_CASE("a rank killed or hung mid-run makes the other exit non-zero within the timeout, naming itself and the cause", "[sp][cli]") {
  struct Case {
    const char* name;
    int signal;
  };
  // SIGKILL: the peer's sockets close, noticed at once. SIGSTOP: the peer stays connected but
  // silent, so only the c10d timeout (6 s here) ends the wait.
  for (const Case& c : {Case{"killed", SIGKILL}, Case{"hung", SIGSTOP}}) {
    SECTION(c.name) {
      const fs::path root = temp_dir(std::string("kill-") + c.name);
      const int port = free_port();
      // Long enough to be stopped mid-run (thousands of small steps).
      const std::vector<std::string> args{"--threads", "1", "--dist-timeout", "6", "generate", "-p", "a red circle",
                                          "--size", "32x32", "--frames", "5", "--steps", "3000", "--format", "png",
                                          "-o", (root / "out").string()};
      const pid_t r0 = spawn_rank(0, 2, port, args, root / "rank0.log");
      const pid_t r1 = spawn_rank(1, 2, port, args, root / "rank1.log");
      const bool started = wait_for_text(root / "rank0.log", "denoise: 1/3000", 60);
      std::this_thread::sleep_for(std::chrono::seconds(1));  // into the denoising loop
      ::kill(r1, c.signal);
      const auto t0 = std::chrono::steady_clock::now();
      const int code0 = wait_for(r0, 30);
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      ::kill(r1, SIGKILL);
      wait_for(r1, 5);
      const std::string log0 = read_all(root / "rank0.log");
      INFO(log0);
      REQUIRE(started);
      CHECK(code0 == 1);  // it exited by itself, with the runtime-failure code
      CHECK(waited < 6 + 5);  // within the timeout (plus exit)
      if (c.signal == SIGSTOP) CHECK(waited > 3);  // it did wait for the silent peer
      CHECK(log0.find("vdit: error: rank 0 of 2:") != std::string::npos);
      CHECK(!fs::exists(root / "out"));
      fs::remove_all(root);
    }
  }
}

TEST_CASE("vdit launch: a rank killed mid-run ends the job with that rank's status, named in one line", "[sp][cli]") {
  const fs::path root = temp_dir("launch-kill");
  const fs::path log = root / "launch.log";
  const pid_t launcher = ::fork();
  if (launcher == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    const std::string out = (root / "out").string();
    ::execl(VDIT_BINARY, VDIT_BINARY, "launch", "--nproc", "2", "--", "--threads", "1", "--dist-timeout", "10", "generate",
            "-p", "a red circle", "--size", "32x32", "--frames", "5", "--steps", "3000", "--format", "png", "-o",
            out.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  const bool started = wait_for_text(log, "sequence parallel: 2 ranks", 60);
  std::this_thread::sleep_for(std::chrono::seconds(2));
  // The launcher's children, in rank order (it forks rank 0 first).
  std::ifstream children_file("/proc/" + std::to_string(launcher) + "/task/" + std::to_string(launcher) + "/children");
  std::vector<pid_t> children;
  for (pid_t p; children_file >> p;) children.push_back(p);
  REQUIRE(children.size() == 2);
  ::kill(children[1], SIGKILL);
  const int code = wait_for(launcher, 30);
  const std::string text = read_all(log);
  INFO(text);
  REQUIRE(started);
  CHECK(code == 128 + SIGKILL);
  CHECK(text.find("vdit launch: rank 1 was killed by signal 9") != std::string::npos);
  CHECK(::kill(children[0], 0) != 0);  // rank 0 is gone too
  CHECK(!fs::exists(root / "out"));
  fs::remove_all(root);
}
