// `vdit launch --nproc N -- ARGS...`: N local ranks of `vdit ARGS...` with the torchrun
// environment, for users without PyTorch's torchrun. It sets RANK, WORLD_SIZE, LOCAL_RANK,
// LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT and nothing else; the ranks rendezvous through
// c10d themselves (vdit/distributed.h). The first rank to fail ends the job: its line says which
// and why, the other ranks get SIGTERM (SIGKILL after a grace period), and its exit code is the
// launcher's.
#include "cli_common.h"
#include "commands.h"

#include "vdit/common.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstring>
#include <iostream>
#include <thread>
#include <vector>

namespace vdit::cli {

namespace {

struct LaunchOptions {
  int nproc = 0;
  int master_port = 0;  // 0: a free port
  double grace = 10.0;
  std::vector<std::string> args;
};

// A TCP port nobody listens on now (the kernel's pick for port 0); rank 0's store binds it soon after.
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw RuntimeError(std::string("vdit launch: socket: ") + std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    throw RuntimeError(std::string("vdit launch: no free port: ") + std::strerror(errno));
  }
  const int port = ntohs(addr.sin_port);
  ::close(fd);
  return port;
}

std::string this_executable() {
  std::vector<char> buf(4096);
  const ssize_t n = ::readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  if (n <= 0) throw RuntimeError("vdit launch: cannot find this executable (/proc/self/exe)");
  return std::string(buf.data(), static_cast<std::size_t>(n));
}

// exit status -> (exit code, reason text)
std::pair<int, std::string> describe(int status) {
  if (WIFEXITED(status)) return {WEXITSTATUS(status), "exited with code " + std::to_string(WEXITSTATUS(status))};
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    return {128 + sig, "was killed by signal " + std::to_string(sig) + " (" + strsignal(sig) + ")"};
  }
  return {1, "ended abnormally"};
}

int run_launch(const LaunchOptions& o) {
  const std::string exe = this_executable();
  const int port = o.master_port > 0 ? o.master_port : free_port();
  std::vector<pid_t> pids(static_cast<std::size_t>(o.nproc), -1);
  for (int rank = 0; rank < o.nproc; ++rank) {
    const pid_t pid = ::fork();
    if (pid < 0) throw RuntimeError(std::string("vdit launch: fork: ") + std::strerror(errno));
    if (pid == 0) {
      // A rank must not outlive its launcher.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      ::setenv("RANK", std::to_string(rank).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(o.nproc).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(o.nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      std::vector<char*> argv;
      argv.push_back(const_cast<char*>("vdit"));
      for (const auto& a : o.args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv(exe.c_str(), argv.data());
      std::cerr << "vdit launch: rank " << rank << ": exec " << exe << ": " << std::strerror(errno) << std::endl;
      ::_exit(127);
    }
    pids[static_cast<std::size_t>(rank)] = pid;
  }

  int running = o.nproc;
  int exit_code = 0;
  bool stopping = false;
  std::chrono::steady_clock::time_point kill_at;
  while (running > 0) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, stopping ? WNOHANG : 0);
    if (pid < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (pid == 0) {  // stopping and nobody exited yet
      if (std::chrono::steady_clock::now() >= kill_at) {
        for (pid_t p : pids)
          if (p > 0) ::kill(p, SIGKILL);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    int rank = -1;
    for (int r = 0; r < o.nproc; ++r)
      if (pids[static_cast<std::size_t>(r)] == pid) rank = r;
    if (rank < 0) continue;
    pids[static_cast<std::size_t>(rank)] = -1;
    --running;
    const auto [code, reason] = describe(status);
    if (code != 0 && !stopping) {
      // The first failure: it names the job's outcome; the others are brought down.
      std::cerr << "vdit launch: rank " << rank << " " << reason << "; stopping the other " << running << " rank"
                << (running == 1 ? "" : "s") << std::endl;
      exit_code = code;
      stopping = true;
      kill_at = std::chrono::steady_clock::now() +
                std::chrono::milliseconds(static_cast<std::int64_t>(o.grace * 1000.0));
      for (pid_t p : pids)
        if (p > 0) ::kill(p, SIGTERM);
    }
  }
  return exit_code;
}

}  // namespace

void register_launch_command(CLI::App& app, GlobalOptions& global) {
  auto o = std::make_shared<LaunchOptions>();
  CLI::App* cmd = app.add_subcommand(
      "launch", "Run `vdit ARGS...` as N local ranks of one job (as torchrun does): vdit launch --nproc 2 -- --threads 1 generate ...");
  cmd->add_option("--nproc", o->nproc, "Number of ranks (processes) on this machine")->required();
  cmd->add_option("--master-port", o->master_port, "Rendezvous port on 127.0.0.1 (default: a free port)");
  cmd->add_option("--grace", o->grace, "Seconds the other ranks get after SIGTERM before SIGKILL when one fails")
      ->capture_default_str();
  cmd->add_option("args", o->args, "The vdit command line every rank runs (after --), global options included");
  cmd->footer(
      "Each rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and MASTER_PORT, as\n"
      "torchrun sets them (multi-machine jobs: torchrun or Slurm with these variables). The exit code is the first\n"
      "failing rank's (128+signal when killed); that rank is named and the others are stopped.");
  cmd->callback([o, cmd, &global] {
    if (o->nproc < 1 || o->nproc > 1024) throw InputError("--nproc must be in [1, 1024], got " + std::to_string(o->nproc));
    if (o->master_port < 0 || o->master_port > 65535)
      throw InputError("--master-port must be in [0, 65535], got " + std::to_string(o->master_port));
    if (!(o->grace >= 0 && o->grace <= 3600)) throw InputError("--grace must be in [0, 3600] seconds");
    if (o->args.empty()) throw InputError("vdit launch: give the command after --, e.g. vdit launch --nproc 2 -- generate -p ...");
    if (o->args.front() == "launch") throw InputError("vdit launch: the ranks' command cannot be launch itself");
    const int code = run_launch(*o);
    if (code != 0) throw ExitStatus{code};
  });
}

}  // namespace vdit::cli
