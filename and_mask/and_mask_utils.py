"""AND-mask and the geometric mean of per-environment gradients (Parascandolo et al., ICLR 2021):
the original module's API, `get_grads` with its original signature and `get_grads_from_model`.

The math, its notation (τ = 0 is plain averaging, τ = 1 unanimity, sign(0) = 0, the per-tensor
rescaling) and the rules themselves are `and_mask.core.masks`, which gen_mask registers too;
both packages' `get_grads` are thin over `and_mask.core.library`.
"""
from __future__ import annotations

from and_mask.core.combiners import CombinerRegistry, MethodFlags
from and_mask.core.library import combine_model, combine_output
from and_mask.core.masks import (  # noqa: F401
    AGREEMENT_THRESHOLD,
    AND_MASK,
    GEOM_MEAN,
    SCALE_GRAD_INVERSE_SPARSITY,
    agreement_mask,
    and_mask,
    and_mask_outer,
    geom_mean,
    sign_sum,
)

COMBINERS = CombinerRegistry({c.name: c for c in (AND_MASK, GEOM_MEAN)})
METHOD_FLAGS = MethodFlags(COMBINERS, required=True)


def _checked(method):
    if method not in COMBINERS:
        raise ValueError(f"method must be one of {sorted(COMBINERS)}, got {method!r}")
    return method


def get_grads(agreement_threshold, batch_size, loss_fn, n_agreement_envs, params, output, target, method,
              scale_grad_inverse_sparsity, engine="shared"):
    """Combine per-environment gradients with the AND-mask or the geometric mean (original API).

    `output`/`target` hold n_agreement_envs × batch_size examples stacked env after env, produced
    by one forward pass. Writes the combined gradient into each `param.grad` and returns
    (mean_loss, masks): the mean over environments of their mean losses, and the float mask of
    every parameter tensor. `engine` is "shared" (vectorised backward passes) or "loop" (one
    backward per environment, the original); both give the same gradients.
    """
    hparams = {"agreement_threshold": agreement_threshold, "scale_grad_inverse_sparsity": scale_grad_inverse_sparsity}
    mean_loss, diagnostics = combine_output(COMBINERS, _checked(method), batch_size, n_agreement_envs, loss_fn, params,
                                            output, target, engine, hparams)
    return mean_loss, [d["mask"] for d in diagnostics]


def get_grads_from_model(model, inputs, target, loss_fn, n_agreement_envs, agreement_threshold, method,
                         scale_grad_inverse_sparsity, engine="auto", chunk_size=None):
    """Same result as `get_grads`, starting from the model so that a faster engine can be used.

    `inputs`/`target` hold n_agreement_envs environments of equal size stacked env after env.
    `engine`: "auto", "outer", "vmap", "shared" or "loop" (see `and_mask.core.per_env_grads`).
    Writes `param.grad` of the model's trainable parameters; returns (mean_loss, masks).
    """
    hparams = {"agreement_threshold": agreement_threshold, "scale_grad_inverse_sparsity": scale_grad_inverse_sparsity}
    mean_loss, diagnostics = combine_model(COMBINERS, _checked(method), model, inputs, target, loss_fn,
                                           n_agreement_envs, engine, chunk_size, hparams)
    return mean_loss, [d["mask"] for d in diagnostics]
