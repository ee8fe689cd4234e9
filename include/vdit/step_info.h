// What every piece of a denoising run can know about "now": the step being taken and the role of
// each batch row of a model forward. Shared by the loop, guidance, the models and the attention
// processors, so none of them has to guess from tensor sizes.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

namespace vdit {

// One step of a flow run. Sampling walks sigma down (sigma_next < sigma); inversion walks it up.
struct StepInfo {
  int index = 0;          // this step's position in the schedule (sampling: the sampler's step index)
  int first = 0;          // index of the first step the run takes (> 0 when it starts part-way)
  int count = 0;          // steps in the whole schedule; the run takes indices first .. count-1
  double sigma = 1.0;     // noise level of the latent the step starts from
  double sigma_next = 0;  // noise level it ends at
  double timestep = 0;    // the model's timestep input at sigma
  int done() const { return index + 1 - first; }   // steps finished once this one is
  int total() const { return count - first; }      // steps this run takes
};

// What a batch row of a model forward is for. Guidance names its passes with these; processors
// select the rows they act on with them.
enum class RowRole : std::uint8_t {
  Cond,       // the prompt
  Uncond,     // the negative prompt (classifier-free guidance)
  Perturbed,  // the prompt through perturbed attention (PAG / SoftPAG / skip-layer)
  Guide,      // the prompt through a weaker guide model (autoguidance)
  Source,     // editing: the source prompt
  Target,     // editing: the target prompt
  SkipLayer,  // the prompt with some blocks skipped (skip-layer guidance, DiTCall::skip_blocks)
};
const char* role_name(RowRole role);
std::ostream& operator<<(std::ostream& out, RowRole role);  // its role_name

}  // namespace vdit
