#include "vdit/progress.h"

#include "vdit/common.h"

#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <sstream>

namespace vdit {

std::string format_duration(double seconds) {
  char buf[32];
  if (seconds < 60) {
    std::snprintf(buf, sizeof buf, "%.1fs", seconds);
  } else if (seconds < 3600) {
    std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(seconds) / 60, static_cast<int>(seconds) % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%dh%02dm", static_cast<int>(seconds) / 3600, (static_cast<int>(seconds) % 3600) / 60);
  }
  return buf;
}

ProgressBar::ProgressBar(std::string label, std::int64_t total, std::int64_t already_done)
    : label_(std::move(label)),
      total_(total < 1 ? 1 : total),
      already_done_(already_done < 0 ? 0 : already_done),
      tty_(::isatty(STDERR_FILENO) != 0) {
  start_ = std::chrono::steady_clock::now();
  last_plain_ = start_ - std::chrono::hours(1);
}

ProgressBar::~ProgressBar() {
  if (!finished_ && done_ > 0 && tty_ && log_level() != LogLevel::Quiet) std::cerr << std::endl;
}

double ProgressBar::elapsed_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void ProgressBar::update(std::int64_t done, const std::string& note) {
  done_ = done;
  if (log_level() == LogLevel::Quiet) return;
  const double elapsed = elapsed_seconds();
  const std::int64_t seen = done - already_done_;
  const double rate = seen > 0 ? elapsed / static_cast<double>(seen) : 0.0;
  const double eta = rate * static_cast<double>(total_ - done);
  std::ostringstream line;
  if (tty_) {
    const int width = 28;
    const int filled = static_cast<int>(width * done / total_);
    line << "\r" << label_ << " [" << std::string(filled, '#') << std::string(width - filled, '.') << "] " << done << "/"
         << total_ << "  " << format_duration(elapsed);
    if (seen > 0 && done < total_) line << " ETA " << format_duration(eta);
    if (seen > 0) line << "  " << format_duration(rate) << "/it";
    if (!note.empty()) line << "  " << note;
    line << "\033[K";
    std::cerr << line.str() << std::flush;
    return;
  }
  const auto now = std::chrono::steady_clock::now();
  if (done < total_ && now - last_plain_ < std::chrono::seconds(5) && done != 1) return;
  last_plain_ = now;
  line << label_ << ": " << done << "/" << total_ << " elapsed " << format_duration(elapsed);
  if (seen > 0 && done < total_) line << " ETA " << format_duration(eta);
  if (!note.empty()) line << " " << note;
  std::cerr << line.str() << std::endl;
}

void ProgressBar::finish() {
  if (finished_) return;
  if (done_ < total_) update(total_);
  finished_ = true;
  if (tty_ && log_level() != LogLevel::Quiet) std::cerr << std::endl;
}

}  // namespace vdit
