#!/usr/bin/env bash
# The inconsistency of the minima each combiner finds on the synthetic task (spirals with signatures):
# every method of METHODS with 3 seeds, each run ending with the lower bound on I^eps
# (--consistency_eps; and_mask.core.consistency), then one table (and_mask.summarize) in OUT/table.md.
# Usage: bash and_mask/experiments/consistency_synthetic.sh [OUT] [extra flags for every run]
#   environment: EPS (0.1), SEEDS ("0 1 2"), JOBS (runs at once, 1), METHODS (the list below).
# CPU, one thread per run; a finished run (weights_final.pt present) is kept, so a rerun continues.
set -euo pipefail
out=${1:-runs/consistency_synthetic}
shift $(( $# > 0 ? 1 : 0 ))
eps=${EPS:-0.1}
seeds=${SEEDS:-0 1 2}
jobs=${JOBS:-1}
# name and flags; sand_mask at τ = 0.9 learns the spiral, at its default 0.5 the shortcut.
methods=${METHODS:-"mean and_mask geom_mean sand_mask_0.9 pcgrad median"}
flags_of() {
  case $1 in
    sand_mask_0.9) echo "--method sand_mask --agreement_threshold 0.9" ;;
    *) echo "--method $1" ;;
  esac
}
mkdir -p "$out"
for seed in $seeds; do
  for name in $methods; do
    dir="$out/$name-s$seed"
    [ -f "$dir/weights_final.pt" ] && continue  # finished before: keep it
    resume=""
    [ -f "$dir/checkpoint.pt" ] && resume="--resume"
    echo "OMP_NUM_THREADS=1 python -m gen_mask.run_synthetic $(flags_of "$name") --seed $seed --use_cuda 0 --quiet" \
      "--consistency_eps $eps --output_dir $dir $resume $*"
  done
done | xargs -P "$jobs" -I{} sh -c "{}"
python -m and_mask.summarize "$out" | tee "$out/table.md"
