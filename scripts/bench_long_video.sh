#!/usr/bin/env bash
# Long-video cost (issue 43): time and peak RSS of `vdit generate` on the built-in demo model at
# 1x, 2x, 4x and 8x its trained length (9 pixel frames = 3 latent frames; Nx = 3N latent frames),
# windows on above 1x, as ratios to the 1x run. One process per length (peak RSS is per process).
# Usage: scripts/bench_long_video.sh [VDIT_BINARY] [extra generate options...]
set -euo pipefail
VDIT=${1:-build/vdit}
shift || true
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
printf "%-4s %7s %8s %9s %10s %9s %9s\n" "x" "frames" "windows" "time_s" "peak_MiB" "time/1x" "rss/1x"
base_t=""; base_m=""
for n in 1 2 4 8; do
  latent=$((3 * n)); frames=$((4 * (latent - 1) + 1))
  /usr/bin/time -f "%e %M" -o "$OUT/time" "$VDIT" --threads 2 generate -p "a red circle moving right" \
    --frames "$frames" --seed 1 -o "$OUT/out$n.mp4" "$@" 2> "$OUT/log$n" >/dev/null
  read -r t m < "$OUT/time"
  windows=$(grep -o "in [0-9]* windows" "$OUT/log$n" | grep -o "[0-9]*" || echo 1)
  [ -z "$base_t" ] && base_t=$t && base_m=$m
  printf "%-4s %7s %8s %9.2f %10.1f %9.2f %9.2f\n" "${n}x" "$frames" "$windows" "$t" "$(echo "$m/1024" | bc -l)" \
    "$(echo "$t/$base_t" | bc -l)" "$(echo "$m/$base_m" | bc -l)"
done
