"""The library API behind `and_mask_utils.get_grads` and `gen_mask_utils.get_grads`: one implementation.

Two entry points, for a caller's own training loop:
- `combine_output`: from one forward pass's output, whose rows hold n_envs × batch_size examples
  stacked environment after environment (the original `get_grads`); per-environment gradients
  come from backward passes through the shared graph ("shared", vectorised, or "loop", one per
  environment, the original's).
- `combine_model`: from the model and its inputs, so that the fast engines (`outer`, `vmap`) and,
  for a rule that needs them, the environments' Hessian-vector products can be used.
Both write the combined gradient into each parameter's `.grad` and return (mean over
environments of their mean losses, one diagnostics dict per parameter tensor).
"""
from __future__ import annotations

from and_mask.core.combiners import Combiner, CombinerRegistry, apply_combiner, resolve_hparams
from and_mask.core.per_env_grads import env_losses_from_output, grads_from_output, per_env_grads
from and_mask.core.per_env_hvp import env_hvp


def combine_into_params(params, grads, combiner: Combiner, hparams: dict, hvp=None) -> list[dict]:
    """Write the combination of `grads` (one (E, *shape) tensor per parameter) into each `param.grad`."""
    combined, diagnostics = apply_combiner(combiner, grads, hparams, hvp)
    for param, grad in zip(params, combined):
        param.grad = grad
    return diagnostics


def combine_output(registry: CombinerRegistry, method: str, batch_size: int, n_envs: int, loss_fn, params, output,
                   target, engine: str = "shared", hyperparameters: dict | None = None):
    """Combine the per-environment gradients of a finished forward pass with the rule `method`."""
    combiner = registry[method]  # an unknown name fails here, listing the valid ones
    if output.shape[0] != n_envs * batch_size:
        raise ValueError(f"output has {output.shape[0]} rows, expected n_envs * batch_size = {n_envs * batch_size}")
    if combiner.needs_hvp:
        raise ValueError(f"{method} needs the environments' Hessian-vector products, which a finished forward pass "
                         "cannot give: use get_grads_from_model")
    hparams = resolve_hparams(combiner, hyperparameters or {})
    params = list(params)
    env_losses = env_losses_from_output(output, target, loss_fn, n_envs)
    grads = grads_from_output(env_losses, params, engine=engine)
    return env_losses.detach().mean(), combine_into_params(params, grads, combiner, hparams)


def combine_model(registry: CombinerRegistry, method: str, model, inputs, target, loss_fn, n_envs: int,
                  engine: str = "auto", chunk_size: int | None = None, hyperparameters: dict | None = None):
    """Combine the per-environment gradients of `model` on `inputs` (environments of equal size,
    stacked) with the rule `method`, through the engine `engine` (see `and_mask.core.per_env_grads`)."""
    combiner = registry[method]
    hparams = resolve_hparams(combiner, hyperparameters or {})
    result = per_env_grads(model, inputs, target, loss_fn, n_envs, engine=engine, chunk_size=chunk_size,
                           accepts_outer=True)
    hvp = env_hvp(model, inputs, target, loss_fn, n_envs, engine, chunk_size) if combiner.needs_hvp else None
    params = [p for p in model.parameters() if p.requires_grad]
    return result.env_losses.mean(), combine_into_params(params, result.grads, combiner, hparams, hvp)
