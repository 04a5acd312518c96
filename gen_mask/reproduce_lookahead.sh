#!/usr/bin/env bash
# Lookahead alignment against averaging and the AND-mask on the synthetic task, seeds 0, 1, 2,
# every other flag at its default (CPU, one run at a time; a finished run is kept on a rerun).
# Usage: bash gen_mask/reproduce_lookahead.sh [OUT] [FLAGS...]    then: python -m and_mask.summarize OUT
# FLAGS are added to every run, e.g. the end-of-run consistency estimate (--consistency_eps E).
set -euo pipefail
out=${1:-runs/lookahead_synthetic}
shift $(( $# > 0 ? 1 : 0 ))
run() {  # run NAME SEED FLAGS...
  local name=$1 seed=$2; shift 2
  [ -f "$out/$name-s$seed/weights_final.pt" ] && return 0  # finished before: keep it
  OMP_NUM_THREADS=1 python -m gen_mask.run_synthetic --quiet --use_cuda 0 --seed "$seed" \
    --output_dir "$out/$name-s$seed" "$@"
}
for seed in 0 1 2; do
  run mean "$seed" --method mean "$@"
  run and_mask "$seed" --method and_mask --agreement_threshold 1 --scale_grad_inverse_sparsity 1 "$@"
  run lookahead "$seed" --method lookahead "$@"
done
