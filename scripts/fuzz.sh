#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz, with clang, against the main build's libraries) and runs
# each for SECONDS (default 12; `make test` runs this: five targets, a minute in all), seeded from
# tests/fixtures.
# Skips, saying why, where clang++ is missing. Exits 1 on the first crash, leaving the crashing
# input in $FUZZ_DIR/artifacts (replay: $FUZZ_DIR/<target> <input>).
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# Environment: BUILD_DIR (the main build, default build), FUZZ_DIR (default build-fuzz), JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-12}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fuzz_safetensors_header fuzz_weight_file fuzz_json_configs fuzz_prompt fuzz_spm_model)
build_dir=${BUILD_DIR:-build}
fuzz_dir=${FUZZ_DIR:-build-fuzz}
jobs=${JOBS:-$(nproc)}

if ! command -v clang++ >/dev/null 2>&1; then
  echo "fuzz: skipped: clang++ is not installed (Debian: apt-get install clang)"
  exit 0
fi
if [ ! -f "$build_dir/libvdit.a" ]; then
  echo "fuzz: $build_dir/libvdit.a is missing: build the main project first (make build)" >&2
  exit 1
fi

cmake -S tests/fuzz -B "$fuzz_dir" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE= \
  -DVDIT_LIB_DIR="$(cd "$build_dir" && pwd)" >/dev/null
cmake --build "$fuzz_dir" -j "$jobs" --target "${targets[@]}"

# Seeds: read-only corpora from tests/fixtures, and tests/fuzz/regressions/<target> (inputs that once
# crashed a target, run first every time); what a run adds goes to $fuzz_dir/corpus/<target>.
seeds="$fuzz_dir/seeds"
rm -rf "$seeds"
mkdir -p "$seeds/weight_file" "$seeds/json" "$seeds/prompt" "$seeds/spm" "$fuzz_dir/artifacts"
cp tests/fixtures/tokenizer/*.model "$seeds/spm/"
cp tests/fixtures/malformed/*.safetensors tests/fixtures/wan-tiny/t5/weights_bf16.pth "$seeds/weight_file/"
printf '{"weight_map": {"a": "missing.safetensors"}}' >"$seeds/weight_file/index.json"
cp configs/*.json configs/demo/*.json tests/fixtures/wan-tiny/e2e/dit_config.json "$seeds/json/"
for f in models/shapes/*/config.json models/shapes/scheduler/scheduler_config.json models/shapes/vdit-demo.json; do
  if [ -f "$f" ]; then cp "$f" "$seeds/json/$(basename "$(dirname "$f")")-$(basename "$f")"; fi
done
head -c 2000 tests/fixtures/tokenizer/corpus.txt >"$seeds/prompt/corpus"
printf 'a &amp;amp; b&#x41;&#65&ampx &hellip;\xc2\xa0\xe3\x80\x80 end \xe2\x80\xa8' >"$seeds/prompt/entities"

seed_dirs() {
  case "$1" in
    fuzz_safetensors_header) echo tests/fixtures/malformed tests/fixtures/loop-golden ;;
    fuzz_weight_file) echo "$seeds/weight_file" ;;
    fuzz_json_configs) echo "$seeds/json" tests/fixtures/demo-recipes tests/fuzz/regressions/json_configs ;;
    fuzz_prompt) echo "$seeds/prompt" ;;
    fuzz_spm_model) echo "$seeds/spm" ;;
  esac
}

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
for t in "${targets[@]}"; do
  mkdir -p "$fuzz_dir/corpus/$t"
  log="$fuzz_dir/$t.log"
  # shellcheck disable=SC2046
  if ! "$fuzz_dir/$t" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
      -artifact_prefix="$fuzz_dir/artifacts/$t-" "$fuzz_dir/corpus/$t" $(seed_dirs "$t") >"$log" 2>&1; then
    grep -v '^warning: ' "$log" | tail -60
    echo "fuzz: $t crashed; the input is in $fuzz_dir/artifacts/, the log in $log" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1)
  echo "fuzz: $t: ${seconds}s, $runs inputs, ${cov:-cov: ?} edges, no crash"
done
