"""The AND-mask and the geometric mean of per-environment gradients (Parascandolo et al., ICLR 2021):
the one implementation, which `and_mask.and_mask_utils` and `gen_mask.gen_mask_utils` register.

Notation, per parameter tensor: E environments, g_e the gradient of environment e's mean loss,
ḡ = mean_e g_e, sign(0) = 0, and the agreement a = |mean_e sign(g_e)| ∈ [0, 1] per coordinate.
The mask keeps the coordinates where the environments agree: m = 1[a ≥ τ].

- τ = 0 keeps every coordinate: AND-mask is then plain averaging (the baseline).
- τ = 1 keeps a coordinate only if every environment has the same non-zero sign; an
  environment whose gradient is exactly 0 there counts as sign 0 and breaks unanimity.
- With `scale_grad_inverse_sparsity` the update of each tensor is multiplied by
  1 / (1e-10 + mean(m)), compensating for the fraction of coordinates masked out.

Both are computed from sums over environments (`SumRule`), so that a run split across processes
adds up Σ_e g_e and Σ_e sign(g_e) instead of gathering every gradient; the helpers (`sign_sum`,
`mask_from_signs`, `rescale`, `sums_and_signs`) are public for rules built on them (SAND-mask).
"""
from __future__ import annotations

import torch

from and_mask.core.combiners import Combiner, HParam, SumRule
from and_mask.core.per_env_grads import OuterProducts

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


def mask_from_signs(signs: torch.Tensor, n_envs: int, agreement_threshold: float) -> torch.Tensor:
    """m = 1[|Σ_e sign(g_e)| / E >= τ] as a float tensor."""
    return (signs.abs() / n_envs >= agreement_threshold).to(signs.dtype)


def agreement_mask(grads: torch.Tensor, agreement_threshold: float) -> torch.Tensor:
    """Float mask m = 1[|mean_e sign(g_e)| >= τ] for grads of shape (E, *shape)."""
    return mask_from_signs(sign_sum(grads), grads.shape[0], agreement_threshold)


def rescale(update, mask, scale_grad_inverse_sparsity):
    """update / (1e-10 + mean(m)) when scale_grad_inverse_sparsity (per tensor), else the update itself."""
    if scale_grad_inverse_sparsity:
        update = update * (1.0 / (1e-10 + mask.sum() / mask.numel()))
    return update


def sums_and_signs(grads, totals):
    """Σ_e g_e and Σ_e sign(g_e)."""
    return {"sum": grads.sum(dim=0), "sign_sum": sign_sum(grads)}


def sums_and_signs_outer(grads: OuterProducts, totals):
    """The same sums of G[i] = δ_i x_iᵀ without building them: ΔᵀX and sign(Δ)ᵀ sign(X).

    sign(δ_i x_iᵀ) = sign(δ_i) sign(x_i)ᵀ, so Σ_i sign(G[i]) = sign(Δ)ᵀ sign(X): a sum of integers
    (exact in floating point), hence exactly the sign count of the materialised gradients.
    """
    return {"sum": grads.output_grads.T @ grads.inputs,
            "sign_sum": torch.sign(grads.output_grads).T @ torch.sign(grads.inputs)}


def _and_mask_update(totals, agreement_threshold=1.0, scale_grad_inverse_sparsity=1):
    mask = mask_from_signs(totals["sign_sum"], totals["n_envs"], agreement_threshold)
    update = rescale(mask * (totals["sum"] / totals["n_envs"]), mask, scale_grad_inverse_sparsity)
    return update, {"mask": mask}


def _geom_mean_sums(grads, totals):
    """Σ_e g_e, Σ_e sign(g_e) and Σ_e log(|g_e| + 1e-10)."""
    return {**sums_and_signs(grads, totals), "log_abs_sum": torch.log(grads.abs() + 1e-10).sum(dim=0)}


def _geom_mean_update(totals, agreement_threshold=1.0, scale_grad_inverse_sparsity=1):
    n_envs = totals["n_envs"]
    mask = mask_from_signs(totals["sign_sum"], n_envs, agreement_threshold)
    magnitude = torch.exp(totals["log_abs_sum"] / n_envs)
    update = rescale(mask * torch.sign(totals["sum"]) * magnitude, mask, scale_grad_inverse_sparsity)
    return update, {"mask": mask}


AND_MASK_SUMS = SumRule(rounds=(sums_and_signs,), finish=_and_mask_update, outer_rounds=(sums_and_signs_outer,),
                        counts=("sign_sum",))
GEOM_MEAN_SUMS = SumRule(rounds=(_geom_mean_sums,), finish=_geom_mean_update, counts=("sign_sum",))


def and_mask(grads: torch.Tensor, agreement_threshold: float = 1.0, scale_grad_inverse_sparsity: int = 1):
    """AND-mask: m ⊙ mean_e g_e, m = 1[|mean_e sign(g_e)| >= τ] (Parascandolo et al., ICLR 2021)."""
    return AND_MASK_SUMS.combine(grads, agreement_threshold=agreement_threshold,
                                 scale_grad_inverse_sparsity=scale_grad_inverse_sparsity)


def and_mask_outer(grads: OuterProducts, agreement_threshold: float = 1.0, scale_grad_inverse_sparsity: int = 1):
    """AND-mask of per-example Linear-weight gradients G[i] = δ_i x_iᵀ without building them.

    mean_i sign(G[i]) = sign(Δ)ᵀ sign(X) / N and mean_i G[i] = ΔᵀX / N (`sums_and_signs_outer`),
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
