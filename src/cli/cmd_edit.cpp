// `vdit edit`: Prompt-to-Prompt edits of a generated or a real (inverted) video or image.
#include "cli_common.h"
#include "commands.h"
#include "edit_session.h"
#include "option_groups.h"

#include "vdit/common.h"
#include "vdit/io/init_video.h"
#include "vdit/io/input_file.h"
#include "vdit/progress.h"

#include <cmath>
#include <filesystem>
#include <iostream>
#include <sstream>

namespace vdit::cli {

namespace fs = std::filesystem;

namespace {

struct EditCommandOptions {
  std::string source_prompt, target_prompt, source_out;
  ModelOptions model;
  SamplingOptions sampling = sampling_defaults(T2VSettings{});
  GuidanceOptions guidance = guidance_defaults(T2VSettings{});
  OutputOptions output;
  std::string input, inversion = "fixed-point";
  int inversion_iterations = 3;
  int inversion_steps = 0;
  EditControls controls;
  std::string edit_layers, blend;
  std::vector<std::string> reweight;
};

std::string number_text(double value) {
  std::ostringstream out;
  out << value;
  return out.str();
}

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> out;
  std::string item;
  std::istringstream in(text);
  while (std::getline(in, item, separator)) out.push_back(item);
  return out;
}

// "WORD=F" -> (WORD, F)
std::pair<std::string, double> parse_reweight(const std::string& text) {
  const auto eq = text.rfind('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == text.size())
    throw InputError("--reweight must be WORD=FACTOR, got '" + text + "'");
  const std::string word = text.substr(0, eq), number = text.substr(eq + 1);
  std::size_t used = 0;
  double factor = 0;
  try {
    factor = std::stod(number, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != number.size() || !std::isfinite(factor))
    throw InputError("--reweight " + word + ": '" + number + "' is not a finite number");
  return {word, factor};
}

std::set<int> parse_layers(const std::string& text) {
  std::set<int> layers;
  for (const std::string& item : split(text, ',')) {
    std::size_t used = 0;
    int layer = -1;
    try {
      layer = std::stoi(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size() || layer < 0)
      throw InputError("--edit-layers must list layer indices >= 0 (L,L,...), got '" + text + "'");
    layers.insert(layer);
  }
  return layers;
}

std::string controls_text(const EditControls& c) {
  std::string layers, reweight, blend;
  for (int l : c.layers) layers += (layers.empty() ? "" : ",") + std::to_string(l);
  for (const auto& [w, f] : c.reweight) reweight += (reweight.empty() ? "" : ",") + w + "=" + number_text(f);
  for (const auto& w : c.blend) blend += (blend.empty() ? "" : ",") + w;
  return "cross_replace " + number_text(c.cross_replace) + ", self_replace " + number_text(c.self_replace) +
         ", edit_layers " + (layers.empty() ? "all" : layers) + ", reweight " + (reweight.empty() ? "none" : reweight) +
         ", blend " + (blend.empty() ? "none" : blend + " (threshold " + number_text(c.blend_threshold) + ")");
}

}  // namespace

void register_edit_command(CLI::App& app, GlobalOptions& global) {
  auto o = std::make_shared<EditCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "edit", "Prompt-to-Prompt: edit a generated (or, with --input, a real) video or image by changing words of its prompt");
  cmd->add_option("-p,--prompt", o->source_prompt, "The source prompt (what the video shows)")->required();
  cmd->add_option("--target-prompt", o->target_prompt,
                  "The edited prompt: the same words with some swapped (swap), or words added (refine)")
      ->required();
  cmd->add_option("--source-out", o->source_out, "Also write the source (the unedited regeneration) to this file");
  add_model_options(*cmd, o->model);
  add_sampling_options(*cmd, o->sampling);
  cmd->add_option("-g,--guidance", o->guidance.guidance,
                  "Classifier-free guidance scale for both rows (1: off; default: the model's, 1 with --input)");
  cmd->add_option_function<std::string>(
      "-n,--negative-prompt", [o](const std::string& v) { o->guidance.negative_prompt = v; },
      "Negative prompt (default: the model's vdit-demo.json, else Wan2.1's own)");
  add_output_options(*cmd, o->output);
  cmd->add_option("--input", o->input,
                  "A real image, video or PNG frame directory to edit: encoded, inverted to noise under the source "
                  "prompt (guidance 1, Euler grid) and regenerated with the edit");
  cmd->add_option("--inversion", o->inversion,
                  "euler (plain Euler inversion) | fixed-point (each step's velocity taken at its end point, found by "
                  "fixed-point iterations)")
      ->capture_default_str();
  cmd->add_option("--inversion-iterations", o->inversion_iterations, "Fixed-point iterations per inversion step, 1 to 20")
      ->capture_default_str();
  cmd->add_option("--inversion-steps", o->inversion_steps,
                  "Invert only the last N steps of the schedule and regenerate from there (default: all steps)");
  cmd->add_option("--cross-replace", o->controls.cross_replace,
                  "Share of the steps (from the first) whose cross-attention maps come from the source, in [0, 1]")
      ->capture_default_str();
  cmd->add_option("--self-replace", o->controls.self_replace,
                  "Share of the steps (from the first) whose self-attention maps come from the source (layout), in [0, 1]")
      ->capture_default_str();
  cmd->add_option("--edit-layers", o->edit_layers, "DiT blocks whose attention is edited, L,L,... (default: all)");
  cmd->add_option("--reweight", o->reweight,
                  "WORD=F: scale the attention to a target-prompt word by F (repeatable; no renormalisation)");
  cmd->add_option("--blend", o->blend,
                  "WORD[,WORD]: local blend, keep the change only where these words' cross-attention maps are strong; "
                  "elsewhere the latent is the source's");
  cmd->add_option("--blend-threshold", o->controls.blend_threshold, "Local blend mask threshold, in (0, 1)")
      ->capture_default_str();
  cmd->footer(
      "The edit kind follows from the prompts: identical (the edit equals the source), same number of words (swap),\n"
      "otherwise refine (token alignment). Source and target share the start noise (--seed) or the inverted --input.\n"
      "Every option and path is checked before any model loads: bad input exits 2 with one line and writes nothing.");

  cmd->callback([o, cmd, &global] {
    // ---- the validation layer: nothing is loaded before all of this passed.
    const bool has_input = !o->input.empty();
    if (has_input) check_input_path(o->input, "--input", InputKind::FileOrDirectory);
    const InversionMethod method = parse_inversion_method(o->inversion);
    if (o->inversion_iterations < 1 || o->inversion_iterations > 20)
      throw InputError("--inversion-iterations must be 1 to 20, got " + std::to_string(o->inversion_iterations));
    if (cmd->count("--inversion-steps") && (o->inversion_steps < 1 || !has_input))
      throw InputError(has_input ? "--inversion-steps must be >= 1" : "--inversion-steps needs --input");
    for (const std::string& r : o->reweight) o->controls.reweight.push_back(parse_reweight(r));
    if (!o->blend.empty())
      for (const std::string& w : split(o->blend, ','))
        if (!w.empty()) o->controls.blend.push_back(w);
    if (!o->edit_layers.empty()) o->controls.layers = parse_layers(o->edit_layers);
    if (has_input && cmd->count("--sampler") && o->sampling.sampler != "euler")
      throw InputError("--input regenerates on the inversion's Euler grid: --sampler must be euler");

    CheckedRun run = check_run(*cmd, global, o->model, o->sampling, o->guidance, nullptr, &o->output, RunNeeds{},
                               builtin_model_dir());
    T2VSettings& settings = run.settings;
    if (has_input) {
      settings.sampler = "euler";
      if (!cmd->count("--guidance")) settings.guidance = 1.0;
      if (o->inversion_steps > settings.steps)
        throw InputError("--inversion-steps " + std::to_string(o->inversion_steps) + " exceeds --steps " +
                         std::to_string(settings.steps));
    }
    std::optional<OutputPlan> source_plan;
    if (!o->source_out.empty()) {
      OutputOptions source_options = o->output;
      source_options.output = o->source_out;
      source_options.sheet.clear();
      source_options.save_latents.clear();
      source_plan = check_outputs(source_options, settings.frames);
      std::error_code ec;
      if (fs::weakly_canonical(source_plan->output, ec) == fs::weakly_canonical(run.outputs->output, ec))
        throw InputError("--source-out and -o name the same file");
    }
    EditSession session(*run.pipeline, settings);
    EditRequest request;
    request.source_prompt = o->source_prompt;
    request.target_prompt = o->target_prompt;
    request.controls = o->controls;
    request.inversion = method;
    request.inversion_iterations = o->inversion_iterations;
    request.inversion_steps = o->inversion_steps;
    const EditPlan plan = session.plan(o->source_prompt, o->target_prompt, o->controls);  // words, ranges
    if (has_input) {
      request.input_video = read_init_frames(o->input, settings.frames, settings.height, settings.width);
    } else {
      request.noise = settings.noise.defined()
                          ? settings.noise
                          : seeded_noise(t2v_latent_shape(settings, run.pipeline->latent_geometry()), settings.seed);
    }

    // ---- the run.
    std::string kind = edit_kind_name(plan.alignment.kind);
    for (const auto& [a, b] : plan.alignment.changed) kind += " " + a + "->" + b;
    log_info("vdit edit: " + kind + "; " + controls_text(o->controls) +
             (has_input ? "; input " + o->input + ", inversion " + o->inversion : ""));
    std::unique_ptr<ProgressBar> invert_bar, bar;
    const EditOutcome outcome = session.run(
        request,
        [&](int done, int total) {
          if (!bar) bar = std::make_unique<ProgressBar>("edit", total);
          bar->update(done);
        },
        [&](int done, int total) {
          if (!invert_bar) invert_bar = std::make_unique<ProgressBar>("invert", total);
          invert_bar->update(done);
          if (done == total) invert_bar->finish();
        });
    if (bar) bar->finish();
    run.pipeline->release_dit();

    std::map<std::string, std::string> metadata{
        {"prompt", o->target_prompt},
        {"source_prompt", o->source_prompt},
        {"target_prompt", o->target_prompt},
        {"negative_prompt", settings.negative_prompt.value_or(kWanDefaultNegativePrompt)},
        {"seed", has_input ? std::string("none (--input)")
                           : settings.noise.defined() ? std::string("none (--noise file)") : std::to_string(settings.seed)},
        {"size", std::to_string(settings.width) + "x" + std::to_string(settings.height)},
        {"frames", std::to_string(settings.frames)},
        {"steps", std::to_string(settings.steps)},
        {"sampler", settings.sampler},
        {"shift", settings.shift ? number_text(*settings.shift) : std::string("model default")},
        {"guidance", number_text(settings.guidance)},
        {"autoguidance", "off"},
        {"guidance_terms", "none"},
        {"edit_kind", kind},
        {"edit_controls", controls_text(o->controls)},
        {"model", run.model_dir.empty() ? run.files.dit.front() : run.model_dir},
        {"software", "vdit"},
    };
    if (has_input) {
      metadata["input"] = o->input;
      metadata["inversion"] = o->inversion + (method == InversionMethod::FixedPoint
                                                  ? " (" + std::to_string(o->inversion_iterations) + " iterations)"
                                                  : std::string());
      metadata["inversion_steps"] = std::to_string(o->inversion_steps > 0 ? o->inversion_steps : settings.steps);
    }
    T2VResult result;
    result.metadata = metadata;
    result.latents = outcome.target_latent;
    result.video = run.pipeline->decode(outcome.target_latent);
    if (source_plan) {
      T2VResult source;
      source.metadata = metadata;
      source.metadata["prompt"] = o->source_prompt;
      source.metadata["edit_row"] = "source";
      source.latents = outcome.source_latent;
      source.video = run.pipeline->decode(outcome.source_latent);
      write_outputs(*source_plan, source);
    }
    write_outputs(*run.outputs, result, {{"edit_row", "target"}});
  });
}

}  // namespace vdit::cli
