// `vdit heads search`: HeadHunter's greedy search for the attention heads whose perturbation
// guides a model best (pipelines/head_search.h), with the demo judge or a user's scoring program
// as the objective. Writes the chosen set as a file `--pag-heads` reads, and the ranking of every
// head scored.
#include "cli_common.h"
#include "commands.h"
#include "option_groups.h"

#include "vdit/common.h"
#include "vdit/demo/shapes.h"
#include "vdit/io/video_io.h"
#include "vdit/pipelines/head_search.h"
#include "vdit/pipelines/perturbed_guidance.h"
#include "vdit/pipelines/wan_t2v.h"
#include "vdit/progress.h"

#include <nlohmann/json.hpp>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <unistd.h>

namespace vdit::cli {

namespace {

namespace fs = std::filesystem;
using namespace vdit::shapes;

T2VSettings search_defaults() {
  T2VSettings d = shapes_judge_defaults();
  d.seed = 5000;  // disjoint from eval's customary judge seeds (1000.., 2000..)
  return d;
}

struct HeadsOptions {
  ModelOptions model;
  SamplingOptions sampling = sampling_defaults(search_defaults());
  GuidanceOptions guidance = guidance_defaults(search_defaults());
  std::string objective = "shapes";
  std::string out = "heads.json";
  std::string prompts;
  int pairs = 8;
  int top_k = 3;
  int rounds = 1;
  double soft_pag = 1.0;   // the search's u and scale (--soft-pag, --pag-scale of the guidance group)
  double pag_scale = 3.0;
  bool resume = false;
};

std::string default_model_dir() {
  const std::string installed = builtin_model_dir();
  return installed.empty() ? (fs::path(VDIT_SOURCE_DIR) / "models" / "shapes").string() : installed;
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

std::string replace_all(std::string text, const std::string& from, const std::string& to) {
  for (std::size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size()))
    text.replace(at, from.size(), to);
  return text;
}

// Runs the user's scoring program on one clip; its last output line must be one number.
// `trial`: the check before sampling, with the program's stderr taken in too, so that a failure
// is reported as one line.
double run_objective_command(const std::string& command, const std::string& video, const std::string& prompt,
                             bool trial = false) {
  const std::string line = replace_all(replace_all(command, "{video}", shell_quote(video)), "{prompt}", shell_quote(prompt));
  FILE* pipe = ::popen((trial ? "{ " + line + " ; } 2>&1" : line).c_str(), "r");
  if (!pipe) throw InputError("objective command could not start: " + command);
  std::string output;
  std::array<char, 4096> buffer{};
  while (std::fgets(buffer.data(), static_cast<int>(buffer.size()), pipe)) output += buffer.data();
  const int status = ::pclose(pipe);
  std::istringstream lines(output);
  std::string last, l;
  while (std::getline(lines, l))
    if (l.find_first_not_of(" \t\r") != std::string::npos) last = l;
  if (status != 0)
    throw InputError("objective command failed (exit status " + std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : status) +
                     "): " + line + (last.empty() ? "" : " said: " + last));
  const auto a = last.find_first_not_of(" \t\r"), b = last.find_last_not_of(" \t\r");
  const std::string t = a == std::string::npos ? "" : last.substr(a, b - a + 1);
  char* end = nullptr;
  const double value = std::strtod(t.c_str(), &end);
  if (t.empty() || end != t.c_str() + t.size() || !std::isfinite(value))
    throw InputError("objective command printed no number on its last line (got '" + t + "'): " + line);
  return value;
}

std::vector<std::string> read_prompt_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InputError("--prompts " + path + ": cannot read");
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line)) {
    const auto a = line.find_first_not_of(" \t\r"), b = line.find_last_not_of(" \t\r");
    if (a != std::string::npos) out.push_back(line.substr(a, b - a + 1));
  }
  if (out.empty()) throw InputError("--prompts " + path + ": no prompt in the file");
  return out;
}

void run_heads_search(const HeadsOptions& given, CLI::App& cmd, const GlobalOptions& global) {
  HeadsOptions o = given;
  // Every option is checked before a model loads.
  const bool shapes_objective = o.objective == "shapes";
  std::string command;
  if (!shapes_objective) {
    if (o.objective.rfind("cmd:", 0) != 0 || o.objective.size() <= 4)
      throw InputError("--objective must be shapes or cmd:\"PROGRAM {video} {prompt}\" (got '" + o.objective + "')");
    command = o.objective.substr(4);
    if (command.find("{video}") == std::string::npos) throw InputError("--objective cmd: the command must use {video}");
  }
  if (o.pairs < 1 || o.pairs > 100000) throw InputError("--pairs must be from 1 to 100000");
  if (o.top_k < 1) throw InputError("--top-k must be at least 1");
  if (o.rounds < 1 || o.rounds > 1000) throw InputError("--rounds must be from 1 to 1000");
  if (!o.guidance.pag_heads.empty() || !o.guidance.pag_layers.empty())
    throw InputError("--pag-heads / --pag-layers: the search chooses the heads itself");
  if (o.guidance.soft_pag) o.soft_pag = *o.guidance.soft_pag;
  if (o.guidance.pag_scale) o.pag_scale = *o.guidance.pag_scale;
  o.guidance.soft_pag.reset();
  o.guidance.pag_scale.reset();
  if (!(o.soft_pag > 0.0 && o.soft_pag <= 1.0)) throw InputError("--soft-pag must be in (0, 1] for a search");
  if (!std::isfinite(o.pag_scale) || o.pag_scale == 0.0) throw InputError("--pag-scale must be a non-zero finite number");
  {
    const fs::path parent = fs::absolute(o.out).parent_path();
    std::error_code ec;
    if (!fs::is_directory(parent, ec)) throw InputError("--out " + o.out + ": no directory " + parent.string());
  }
  const std::string state_path = o.out + ".state.json";
  std::error_code ec;
  if (o.resume && !fs::exists(state_path, ec)) throw InputError("--resume: no saved search at " + state_path);
  if (!o.resume && fs::exists(state_path, ec))
    throw InputError(state_path + " holds a saved search: continue it with --resume, or remove it");
  std::vector<std::string> prompt_pool;
  if (!o.prompts.empty()) prompt_pool = read_prompt_file(o.prompts);

  const std::string model_dir = o.model.model.empty() ? default_model_dir() : o.model.model;
  RunNeeds needs;
  CheckedRun run = check_run(cmd, global, o.model, o.sampling, o.guidance, nullptr, nullptr, needs, model_dir);
  T2VSettings settings = run.settings;
  WanT2VPipeline& pipeline = *run.pipeline;
  const WanDiTConfig& dit = pipeline.dit_config();

  // The fixed prompt-seed pairs: shapes captions drawn from --seed (or --prompts in order), clip j
  // with seed + j.
  std::vector<std::pair<std::string, std::uint64_t>> pairs;
  std::mt19937_64 caption_rng(settings.seed);
  std::vector<Caption> captions;
  for (int j = 0; j < o.pairs; ++j) {
    std::string prompt;
    if (prompt_pool.empty()) {
      captions.push_back(random_caption(caption_rng));
      prompt = captions.back().text();
    } else {
      prompt = prompt_pool[static_cast<std::size_t>(j) % prompt_pool.size()];
      if (shapes_objective) captions.push_back(Caption::parse(prompt));
    }
    pairs.emplace_back(prompt, settings.seed + static_cast<std::uint64_t>(j));
  }

  // A user's scorer is tried once on a rendered clip before any sampling: a broken command is an
  // error now, not after the first generated clip.
  const fs::path work = fs::temp_directory_path() / ("vdit-heads-" + std::to_string(::getpid()));
  const bool mp4 = [] {
    for (const auto& f : available_video_formats())
      if (f == "mp4") return true;
    return false;
  }();
  const std::string clip_path = (work / (mp4 ? "clip.mp4" : "clip")).string() + (mp4 ? "" : "/");
  struct Cleanup {
    fs::path dir;
    ~Cleanup() {
      std::error_code e;
      fs::remove_all(dir, e);
    }
  } cleanup{work};
  const auto write_clip = [&](const at::Tensor& video) {
    VideoWriteOptions w;
    w.overwrite = true;
    w.fps = 8;
    write_video(clip_path, video, w);
  };
  if (!shapes_objective) {
    fs::create_directories(work);
    std::mt19937_64 rng(1);
    const Caption c = random_caption(rng);
    write_clip(render_clip(c, random_layout(c, settings.width, settings.height, rng), settings.frames, settings.width,
                           settings.height));
    run_objective_command(command, clip_path, pairs.front().first, /*trial=*/true);
  }

  HeadSearchConfig config;
  config.num_layers = dit.num_layers;
  config.num_heads = dit.num_heads;
  config.top_k = o.top_k;
  config.rounds = o.rounds;
  config.fingerprint = {{"model", run.model_dir},
                        {"objective", o.objective},
                        {"pairs", pairs.size()},
                        {"prompts", o.prompts},
                        {"seed", settings.seed},
                        {"soft_pag", o.soft_pag},
                        {"pag_scale", o.pag_scale},
                        {"guidance", settings.guidance},
                        {"steps", settings.steps},
                        {"size", std::to_string(settings.width) + "x" + std::to_string(settings.height)},
                        {"frames", settings.frames}};
  HeadSearchState state;
  if (o.resume) {
    std::ifstream in(state_path);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception&) {
      throw InputError(state_path + ": not valid JSON");
    }
    state = HeadSearchState::from_json(j, config, state_path);
  }

  // Prompts encoded once; DiT and VAE stay loaded for the whole search.
  std::vector<std::string> texts;
  for (const auto& p : pairs) texts.push_back(p.first);
  texts.push_back(settings.negative_prompt.value_or(kWanDefaultNegativePrompt));
  const std::vector<at::Tensor> contexts = pipeline.encode_prompts(texts);
  const at::Tensor null_context = contexts.back();
  const bool guided = settings.guidance != 1.0;
  const std::vector<std::int64_t> latent_shape = t2v_latent_shape(settings, pipeline.latent_geometry());

  const std::int64_t total = head_search_total(config) + 1;
  log_info("vdit heads search: " + std::to_string(dit.num_layers) + " layers x " + std::to_string(dit.num_heads) + " heads, " +
           std::to_string(pairs.size()) + " pairs, top-k " + std::to_string(o.top_k) + ", " + std::to_string(o.rounds) +
           " round(s), u " + std::to_string(o.soft_pag).substr(0, 4) + ", scale " + std::to_string(o.pag_scale).substr(0, 4) +
           ", " + std::to_string(total * static_cast<std::int64_t>(pairs.size())) + " clips in all, objective " + o.objective);
  const std::int64_t already = static_cast<std::int64_t>(state.scored.size()) + (state.baseline ? 1 : 0);
  ProgressBar bar("heads search", total, already);

  const HeadSetObjective objective = [&](const HeadSet& heads) {
    T2VSettings s = settings;
    s.pag_heads = heads;
    s.pag_scale = heads.empty() ? 0.0 : o.pag_scale;
    s.soft_pag = o.soft_pag;
    double sum = 0;
    for (std::size_t j = 0; j < pairs.size(); ++j) {
      const at::Tensor noise = seeded_noise(latent_shape, pairs[j].second);
      s.seed = pairs[j].second;
      const at::Tensor latent = pipeline.denoise(noise, contexts[j], guided ? null_context : contexts[j], s);
      const at::Tensor video = pipeline.decode(latent);
      if (shapes_objective) {
        const Judgement jd = judge_clip(video);
        const Caption& truth = captions[j];
        if (jd.ok) {
          sum += ((jd.colour == truth.colour && jd.colour_steady) ? 1.0 : 0.0) / 3.0 +
                 (jd.shape == truth.shape ? 1.0 : 0.0) / 3.0 + (jd.motion == truth.motion ? 1.0 : 0.0) / 3.0;
        }
      } else {
        write_clip(video);
        sum += run_objective_command(command, clip_path, pairs[j].first);
      }
    }
    return sum / static_cast<double>(pairs.size());
  };
  if (!shapes_objective) fs::create_directories(work);
  const auto save = [&](const HeadSearchState& s) { write_json_atomically(state_path, s.to_json(config)); };
  const auto progress = [&](std::int64_t done, std::int64_t, const HeadScore& last) {
    bar.update(done + 1, "L" + std::to_string(last.layer) + "H" + std::to_string(last.head) + " " +
                             std::to_string(last.score).substr(0, 5));
  };
  const HeadSearchState final_state = head_search(config, objective, state, save, progress);
  bar.finish();

  nlohmann::json ranking = nlohmann::json::array();
  for (int r = 0; r < config.rounds; ++r) {
    nlohmann::json round = nlohmann::json::array();
    for (const auto& s : round_ranking(final_state, r)) round.push_back({{"layer", s.layer}, {"head", s.head}, {"score", s.score}});
    ranking.push_back(round);
  }
  nlohmann::json out = {{"heads", head_set_json(final_state.chosen)},
                        {"soft_pag", o.soft_pag},
                        {"pag_scale", o.pag_scale},
                        {"baseline", final_state.baseline ? nlohmann::json(*final_state.baseline) : nlohmann::json(nullptr)},
                        {"ranking", ranking},
                        {"search", config.fingerprint}};
  write_json_atomically(o.out, out);
  fs::remove(state_path, ec);
  std::cerr << "heads: " << head_set_text(final_state.chosen) << " (baseline " << (final_state.baseline ? *final_state.baseline : 0)
            << ")\n";
  std::cout << o.out << std::endl;
}

}  // namespace

void register_heads_command(CLI::App& app, GlobalOptions& global) {
  CLI::App* heads = app.add_subcommand("heads", "Attention-head tools for perturbed-attention guidance");
  heads->require_subcommand(1);
  auto o = std::make_shared<HeadsOptions>();
  CLI::App* cmd = heads->add_subcommand(
      "search", "HeadHunter's greedy search: score every (layer, head) added to the chosen set by an objective on fixed "
                "prompt-seed pairs, keep the top k per round; writes a head set for --pag-heads");
  add_model_options(*cmd, o->model);
  SamplingHelp help;
  help.seed = "Seed of the pairs: the prompts drawn from it (shapes) and clip j generated with seed+j";
  help.noise = false;
  add_sampling_options(*cmd, o->sampling, help);
  // The shared guidance group: CFG (and autoguidance, SLG, CFG-Zero*) under the search; its
  // --soft-pag and --pag-scale are the search's u and scale; --pag-heads / --pag-layers are refused.
  add_guidance_options(*cmd, o->guidance, "the model's vdit-demo.json, else Wan's");
  cmd->add_option("--objective", o->objective,
                  "shapes (the demo judge: share of colour, shape and motion right) or cmd:\"PROGRAM {video} {prompt}\" "
                  "(run per clip with the clip's path and prompt substituted, shell-quoted; its last output line is the "
                  "score, higher is better)")
      ->capture_default_str();
  cmd->add_option("--out", o->out, "The head set file to write (the state is kept in OUT.state.json until done)")
      ->capture_default_str();
  cmd->add_option("--prompts", o->prompts, "Prompts of the pairs, one per line (default: shapes captions from --seed)");
  cmd->add_option("--pairs", o->pairs, "Prompt-seed pairs each head is scored on (M)")->capture_default_str();
  cmd->add_option("--top-k", o->top_k, "Heads kept per round (k)")->capture_default_str();
  cmd->add_option("--rounds", o->rounds, "Rounds (R)")->capture_default_str();
  cmd->add_flag("--resume", o->resume, "Continue the search saved in OUT.state.json");
  cmd->footer("Model: default " + default_model_dir() + ". Pairs are fixed: every head is scored on the same prompts and seeds.");
  cmd->callback([o, cmd, &global] { run_heads_search(*o, *cmd, global); });
}

}  // namespace vdit::cli
