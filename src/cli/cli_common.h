// Helpers shared by the subcommands: size parsing, the built-in model's location and the
// generation defaults a model directory can ship (vdit-demo.json).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace vdit::cli {

// The name in `known` nearest to `name` by edit distance, when it is near enough to be a likely
// typo (at most a third of the name's letters differ); "" otherwise.
std::string nearest_name(const std::string& name, const std::vector<std::string>& known);

// "WIDTHxHEIGHT" -> (width, height); InputError naming --size otherwise.
std::pair<std::int64_t, std::int64_t> parse_size(const std::string& text);

// The built-in demo model: installed next to the binary (share/vdit/models/shapes) or in the
// source tree the binary was built from. Empty when neither has a model_index.json.
std::string builtin_model_dir();

// DIR/vdit-demo.json: the generation defaults a model ships (the built-in demo model is trained
// for 64x64, 9 frames, 8 fps and an empty negative prompt). Keys: size, frames, steps, sampler, eta,
// shift, guidance, fps, negative_prompt, autoguidance, guide_dit, trained_frames; keys starting with '_' are
// comments; other keys warn, naming the nearest known key. A value of the wrong type is an
// InputError naming the file and the key.
struct ModelDefaults {
  std::optional<std::string> size, sampler, negative_prompt;
  std::optional<std::int64_t> frames;
  // The clip length the model was trained on (pixel frames): longer runs denoise in windows of it.
  // Unset: `frames` (a demo model's defaults are its training length), else Wan2.1's 81.
  std::optional<std::int64_t> trained_frames;
  std::optional<int> steps;
  std::optional<double> eta, shift, guidance, fps, autoguidance;
  std::optional<std::string> guide_dit;  // made absolute: relative paths are relative to the model directory
};
// nullopt when the file does not exist; InputError naming the file when it cannot be read.
std::optional<ModelDefaults> read_model_defaults(const std::string& dir);

}  // namespace vdit::cli
