// Process settings for long CPU training runs (src/demo/process_tuning.cpp).
#pragma once

namespace vdit::demo {

// Process-wide settings that make training steps on the CPU several times faster: flush
// denormals to zero and keep freed buffers in glibc's heap. They affect every thread and every
// later computation of the process, which is why the library never sets them by itself.
void tune_process_for_training();

}  // namespace vdit::demo
