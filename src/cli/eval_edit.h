// `vdit eval shapes --edit`: judges Prompt-to-Prompt edits on the shapes demo model (issue 42).
#pragma once

#include "commands.h"
#include "option_groups.h"

#include "vdit/pipelines/prompt_edit.h"

#include <string>

namespace vdit::cli {

struct EditEvalOptions {
  bool enabled = false;           // --edit
  std::string attributes = "colour,shape,direction";  // --edit-attributes
  double cross_replace = EditControls{}.cross_replace, self_replace = EditControls{}.self_replace;
  bool blend = false;             // --edit-blend: local blend on the swapped words
  bool real = false;              // --edit-real: rendered clips inverted (both methods) and regenerated
  int inversion_iterations = 3;
};
void add_edit_eval_options(CLI::App& cmd, EditEvalOptions& o);

// Runs the edit judge: `clips` source captions per attribute (seed+i for clip i), sampling and
// guidance as the eval's own options give them.
void run_eval_edit(const EditEvalOptions& edit, ModelOptions model, SamplingOptions sampling, GuidanceOptions guidance,
                   int clips, const std::string& model_dir, const CLI::App& cmd, const GlobalOptions& global);

}  // namespace vdit::cli
