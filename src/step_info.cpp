#include "vdit/step_info.h"

#include <ostream>

namespace vdit {

const char* role_name(RowRole role) {
  switch (role) {
    case RowRole::Cond: return "cond";
    case RowRole::Uncond: return "uncond";
    case RowRole::Perturbed: return "perturbed";
    case RowRole::Guide: return "guide";
    case RowRole::Source: return "source";
    case RowRole::Target: return "target";
    case RowRole::SkipLayer: return "skip-layer";
  }
  return "?";
}

std::ostream& operator<<(std::ostream& out, RowRole role) { return out << role_name(role); }

}  // namespace vdit
