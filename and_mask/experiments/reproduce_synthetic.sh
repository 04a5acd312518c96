#!/usr/bin/env bash
# Reproduces the synthetic results of and_mask/README.md ("Synthetic task", "Results").
# Usage: bash and_mask/experiments/reproduce_synthetic.sh {grid|grid2|seeds} [OUT]   (CPU, one run at a time)
# grid, grid2: one seed per setting of a documented grid, to find where AND-mask learns the spiral;
# seeds: 3 seeds of each reported setting. Then: python -m and_mask.summarize OUT/<setting>-s*
set -euo pipefail
stage=${1:-}
out=${2:-runs/synthetic}
run() {  # run NAME SEED FLAGS...
  local name=$1 seed=$2; shift 2
  [ -f "$out/$name-s$seed/weights_final.pt" ] && return 0  # finished before: keep it
  # --resume continues a run that was stopped (and starts one that never began).
  python -m and_mask.run_synthetic --quiet --use_cuda 0 --seed "$seed" --resume --output_dir "$out/$name-s$seed" "$@"
}
if [ "$stage" = grid ]; then
  for wd in 1e-3 0; do
    for tau in 0.2 0.4 0.6 0.8 1.0; do
      run "grid-and_mask-tau$tau-wd$wd" 0 --method and_mask --agreement_threshold "$tau" \
        --scale_grad_inverse_sparsity 1 --weight_decay "$wd"
    done
  done
elif [ "$stage" = grid2 ]; then  # unanimity among fewer environments per step, smaller learning rate
  for n in 2 4 8; do
    run "grid-and_mask-agree$n" 0 --method and_mask --agreement_threshold 1 --scale_grad_inverse_sparsity 1 \
      --n_agreement_envs "$n"
  done
  for tau in 0.8 1.0; do
    run "grid-and_mask-tau$tau-lr1e-3" 0 --method and_mask --agreement_threshold "$tau" \
      --scale_grad_inverse_sparsity 1 --lr 1e-3
  done
elif [ "$stage" = seeds ]; then
  for seed in 0 1 2; do
    run averaging "$seed" --method and_mask --agreement_threshold 0 --scale_grad_inverse_sparsity 0
    run readme-and_mask "$seed" --method and_mask --agreement_threshold 1 --n_train_envs 16 \
      --n_agreement_envs 16 --batch_size 256 --n_dims 16 --scale_grad_inverse_sparsity 1 --n_hidden_units 256
    run readme-geom_mean "$seed" --method geom_mean --agreement_threshold 1 --n_train_envs 16 \
      --n_agreement_envs 16 --batch_size 256 --n_dims 16 --scale_grad_inverse_sparsity 1 --n_hidden_units 256
    run geom_mean "$seed" --method geom_mean --agreement_threshold 1 --scale_grad_inverse_sparsity 1
    run and_mask "$seed" --method and_mask --agreement_threshold 1 --scale_grad_inverse_sparsity 1
  done
else
  echo "unknown stage '$stage': use grid, grid2 or seeds" >&2
  exit 2
fi
