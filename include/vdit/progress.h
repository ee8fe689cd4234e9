// Progress reporting for long work: a redrawn bar with rate and ETA on a terminal, plain
// "label: i/n" lines (at most one every few seconds, plus the last) when stderr is not a terminal.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace vdit {

class ProgressBar {
 public:
  // `already_done`: units finished before this bar started (a resumed run); the rate and ETA
  // count only what this bar sees.
  ProgressBar(std::string label, std::int64_t total, std::int64_t already_done = 0);
  ~ProgressBar();
  // Marks `done` units complete, with an optional note (e.g. "loss 0.123").
  void update(std::int64_t done, const std::string& note = "");
  void finish();
  double elapsed_seconds() const;

 private:
  std::string label_;
  std::int64_t total_;
  std::int64_t done_ = 0;
  std::int64_t already_done_ = 0;
  bool tty_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_plain_;
};

// "1m05s", "12.3s"
std::string format_duration(double seconds);

}  // namespace vdit
