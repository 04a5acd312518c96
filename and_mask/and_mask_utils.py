"""AND-mask and the geometric mean of per-environment gradients (Parascandolo et al., ICLR 2021).

Notation, per parameter tensor: E environments, g_e the gradient of environment e's mean loss,
ḡ = mean_e g_e, sign(0) = 0, and the agreement a = |mean_e sign(g_e)| ∈ [0, 1] per coordinate.
The mask keeps the coordinates where the environments agree: m = 1[a ≥ τ].

- τ = 0 keeps every coordinate: AND-mask is then plain averaging (the baseline).
- τ = 1 keeps a coordinate only if every environment has the same non-zero sign; an
  environment whose gradient is exactly 0 there counts as sign 0 and breaks unanimity.
- With `scale_grad_inverse_sparsity` the update of each tensor is multiplied by
  1 / (1e-10 + mean(m)), compensating for the fraction of coordinates masked out.
"""
from __future__ import annotations

import torch

from and_mask.core.combiners import Combiner, CombinerRegistry, HParam, MethodFlags, SumRule, apply_combiner
from and_mask.core.per_env_grads import OuterProducts, env_losses_from_output, grads_from_output, per_env_grads

AGREEMENT_THRESHOLD = HParam(
    "agreement_threshold", float, 1.0,
    "τ in [0, 1]: keep the coordinates whose sign agreement |mean_e sign(g_e)| is at least τ.", low=0.0, high=1.0)
SCALE_GRAD_INVERSE_SPARSITY = HParam(
    "scale_grad_inverse_sparsity", int, 1,
    "1: multiply each tensor's update by 1/(fraction of its coordinates kept); 0: leave it as it is.", choices=(0, 1))


AGREEMENT_CHUNK = 2 ** 17  # elements of sign(g) materialised at once (512 KiB in float32)


def sign_sum(grads: torch.Tensor) -> torch.Tensor:
    """Σ_e sign(g_e) per coordinate for grads of shape (E, *shape): integers in [−E, E].

    sign(g) is computed a block of coordinates at a time: with many environments (one per
    example) a full-size copy is tens of MB, and writing it, not the arithmetic, dominated the
    step. The sums are of integers and therefore identical either way.
    """
    flat = grads.reshape(grads.shape[0], grads.shape[1:].numel())  # also for zero environments
    columns = max(1, AGREEMENT_CHUNK // max(flat.shape[0], 1))
    sums = [torch.sign(flat[:, start:start + columns]).sum(dim=0) for start in range(0, flat.shape[1], columns)]
    return torch.cat(sums).view(grads.shape[1:]) if sums else flat.sum(dim=0).view(grads.shape[1:])


def _mask_from_signs(signs: torch.Tensor, n_envs: int, agreement_threshold: float) -> torch.Tensor:
    """m = 1[|Σ_e sign(g_e)| / E >= τ] as a float tensor."""
    return (signs.abs() / n_envs >= agreement_threshold).to(signs.dtype)


def agreement_mask(grads: torch.Tensor, agreement_threshold: float) -> torch.Tensor:
    """Float mask m = 1[|mean_e sign(g_e)| >= τ] for grads of shape (E, *shape)."""
    return _mask_from_signs(sign_sum(grads), grads.shape[0], agreement_threshold)


def _rescale(update, mask, scale_grad_inverse_sparsity):
    if scale_grad_inverse_sparsity:
        update = update * (1.0 / (1e-10 + mask.sum() / mask.numel()))
    return update


def _sums_and_signs(grads, totals):
    """Σ_e g_e and Σ_e sign(g_e)."""
    return {"sum": grads.sum(dim=0), "sign_sum": sign_sum(grads)}


def _sums_and_signs_outer(grads: OuterProducts, totals):
    """The same sums of G[i] = δ_i x_iᵀ without building them: ΔᵀX and sign(Δ)ᵀ sign(X).

    sign(δ_i x_iᵀ) = sign(δ_i) sign(x_i)ᵀ, so Σ_i sign(G[i]) = sign(Δ)ᵀ sign(X): a sum of integers
    (exact in floating point), hence exactly the sign count of the materialised gradients.
    """
    return {"sum": grads.output_grads.T @ grads.inputs,
            "sign_sum": torch.sign(grads.output_grads).T @ torch.sign(grads.inputs)}


def _and_mask_update(totals, agreement_threshold=1.0, scale_grad_inverse_sparsity=1):
    mask = _mask_from_signs(totals["sign_sum"], totals["n_envs"], agreement_threshold)
    update = _rescale(mask * (totals["sum"] / totals["n_envs"]), mask, scale_grad_inverse_sparsity)
    return update, {"mask": mask}


def _geom_mean_sums(grads, totals):
    """Σ_e g_e, Σ_e sign(g_e) and Σ_e log(|g_e| + 1e-10)."""
    return {**_sums_and_signs(grads, totals), "log_abs_sum": torch.log(grads.abs() + 1e-10).sum(dim=0)}


def _geom_mean_update(totals, agreement_threshold=1.0, scale_grad_inverse_sparsity=1):
    n_envs = totals["n_envs"]
    mask = _mask_from_signs(totals["sign_sum"], n_envs, agreement_threshold)
    magnitude = torch.exp(totals["log_abs_sum"] / n_envs)
    update = _rescale(mask * torch.sign(totals["sum"]) * magnitude, mask, scale_grad_inverse_sparsity)
    return update, {"mask": mask}


AND_MASK_SUMS = SumRule(rounds=(_sums_and_signs,), finish=_and_mask_update, outer_rounds=(_sums_and_signs_outer,),
                        counts=("sign_sum",))
GEOM_MEAN_SUMS = SumRule(rounds=(_geom_mean_sums,), finish=_geom_mean_update, counts=("sign_sum",))


def and_mask(grads: torch.Tensor, agreement_threshold: float = 1.0, scale_grad_inverse_sparsity: int = 1):
    """AND-mask: m ⊙ mean_e g_e, m = 1[|mean_e sign(g_e)| >= τ] (Parascandolo et al., ICLR 2021)."""
    return AND_MASK_SUMS.combine(grads, agreement_threshold=agreement_threshold,
                                 scale_grad_inverse_sparsity=scale_grad_inverse_sparsity)


def and_mask_outer(grads: OuterProducts, agreement_threshold: float = 1.0, scale_grad_inverse_sparsity: int = 1):
    """AND-mask of per-example Linear-weight gradients G[i] = δ_i x_iᵀ without building them.

    mean_i sign(G[i]) = sign(Δ)ᵀ sign(X) / N and mean_i G[i] = ΔᵀX / N (`_sums_and_signs_outer`),
    so the mask is exactly that of `and_mask` on the materialised gradients.
    """
    return AND_MASK_SUMS.combine(grads, agreement_threshold=agreement_threshold,
                                 scale_grad_inverse_sparsity=scale_grad_inverse_sparsity)


def geom_mean(grads: torch.Tensor, agreement_threshold: float = 1.0, scale_grad_inverse_sparsity: int = 1):
    """Geometric mean: m ⊙ sign(ḡ) ⊙ exp(mean_e log(|g_e| + 1e-10)) (Parascandolo et al., ICLR 2021)."""
    return GEOM_MEAN_SUMS.combine(grads, agreement_threshold=agreement_threshold,
                                  scale_grad_inverse_sparsity=scale_grad_inverse_sparsity)


def _and_mask_is_mean(agreement_threshold, scale_grad_inverse_sparsity):
    # τ = 0 keeps every coordinate, so the update is ḡ (times 1/(1 + 1e-10) when rescaling,
    # which is 1 in float32).
    return agreement_threshold == 0


HPARAMS = (AGREEMENT_THRESHOLD, SCALE_GRAD_INVERSE_SPARSITY)
AND_MASK = Combiner("and_mask", and_mask, hparams=HPARAMS, reduces_to_mean=_and_mask_is_mean, outer=and_mask_outer,
                    sums=AND_MASK_SUMS)
GEOM_MEAN = Combiner("geom_mean", geom_mean, hparams=HPARAMS, sums=GEOM_MEAN_SUMS)
COMBINERS = CombinerRegistry({c.name: c for c in (AND_MASK, GEOM_MEAN)})
METHOD_FLAGS = MethodFlags(COMBINERS, required=True)


def _write_grads(params, grads, method, agreement_threshold, scale_grad_inverse_sparsity):
    hparams = {"agreement_threshold": agreement_threshold, "scale_grad_inverse_sparsity": scale_grad_inverse_sparsity}
    updates, diagnostics = apply_combiner(COMBINERS[method], grads, hparams)
    for param, update in zip(params, updates):
        param.grad = update
    return [d["mask"] for d in diagnostics]


def get_grads(agreement_threshold, batch_size, loss_fn, n_agreement_envs, params, output, target, method,
              scale_grad_inverse_sparsity, engine="shared"):
    """Combine per-environment gradients with the AND-mask or the geometric mean (original API).

    `output`/`target` hold n_agreement_envs × batch_size examples stacked env after env, produced
    by one forward pass. Writes the combined gradient into each `param.grad` and returns
    (mean_loss, masks): the mean over environments of their mean losses, and the float mask of
    every parameter tensor. `engine` is "shared" (vectorised backward passes) or "loop" (one
    backward per environment, the original); both give the same gradients.
    """
    if method not in COMBINERS:
        raise ValueError(f"method must be one of {sorted(COMBINERS)}, got {method!r}")
    if output.shape[0] != n_agreement_envs * batch_size:
        raise ValueError(f"output has {output.shape[0]} rows, expected n_agreement_envs * batch_size = "
                         f"{n_agreement_envs * batch_size}")
    params = list(params)
    env_losses = env_losses_from_output(output, target, loss_fn, n_agreement_envs)
    grads = grads_from_output(env_losses, params, engine=engine)
    masks = _write_grads(params, grads, method, agreement_threshold, scale_grad_inverse_sparsity)
    return env_losses.detach().mean(), masks


def get_grads_from_model(model, inputs, target, loss_fn, n_agreement_envs, agreement_threshold, method,
                         scale_grad_inverse_sparsity, engine="auto", chunk_size=None):
    """Same result as `get_grads`, starting from the model so that a faster engine can be used.

    `inputs`/`target` hold n_agreement_envs environments of equal size stacked env after env.
    `engine`: "auto", "outer", "vmap", "shared" or "loop" (see `and_mask.core.per_env_grads`).
    Writes `param.grad` of the model's trainable parameters; returns (mean_loss, masks).
    """
    if method not in COMBINERS:
        raise ValueError(f"method must be one of {sorted(COMBINERS)}, got {method!r}")
    result = per_env_grads(model, inputs, target, loss_fn, n_agreement_envs, engine=engine, chunk_size=chunk_size,
                           accepts_outer=True)
    params = [p for p in model.parameters() if p.requires_grad]
    masks = _write_grads(params, result.grads, method, agreement_threshold, scale_grad_inverse_sparsity)
    return result.env_losses.mean(), masks
