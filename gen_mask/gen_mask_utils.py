"""The registry of gradient combiners. Adding a rule is one decorated function in this file.

    @COMBINERS.register("my_rule", hparams=[HParam("alpha", float, 0.5, "what α does", low=0)])
    def my_rule(grads, alpha=0.5):
        '''One line that --help shows. grads: (E, *shape) per-environment gradients.'''
        return grads.mean(0) * alpha, {}

Per-tensor rules (scope "tensor", the default) receive one parameter tensor's gradients stacked
as (E, *shape); whole-model rules (scope="model") receive the flattened gradients of all
parameters as (E, P). Each returns (combined gradient, diagnostics dict); a "mask" diagnostic
(float, the gradient's shape) is logged as mask density. A rule computed from sums over
environments declares them (`sums=SumRule(...)`, see `and_mask.core.combiners`), so that a run
split across processes adds up the sums instead of gathering every gradient. Every
hyper-parameter becomes a --flag of the gen_mask run modules, and the test suite checks every
registered rule. Declare
`keeps_consensus=False` when identical environments do not give back their common gradient.
Rules are vectorised torch (CPU or CUDA); the exact small solvers live in `gen_mask.solvers`.
A whole-model rule declared `needs_hvp=True` also receives `hvp`, the environments'
Hessian-vector products (see `and_mask.core.combiners`); lookahead alignment, in
`gen_mask.lookahead`, is one.

A rule kept in a module of one's own joins the registries without touching the repository:
`GEN_MASK_PLUGINS=my_rule` (comma-separated modules) makes this module import it (`load_plugins`).

`OBJECTIVES` holds the second kind of method, training objectives whose update is the ordinary
gradient of a loss over environments (the paper's baselines IRMv1, V-REx and DANN, defined in
`gen_mask.baselines`); --method picks from both registries, which share one name space.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings

import torch

from and_mask.core import masks
from and_mask.core.combiners import CombinerRegistry, HParam, MethodFlags, SumRule
from and_mask.core.library import combine_model, combine_output
from and_mask.core.objectives import ObjectiveRegistry
from gen_mask import baselines, lookahead, solvers

__all__ = ["COMBINERS", "HParam", "METHOD_FLAGS", "OBJECTIVES", "get_grads", "get_grads_from_model"]

COMBINERS = CombinerRegistry()
COMBINERS.add(masks.AND_MASK)  # AND-mask and geometric mean: one implementation, in and_mask.core.masks
COMBINERS.add(masks.GEOM_MEAN)
COMBINERS.add(lookahead.LOOKAHEAD)  # its own module: the math is longer than one rule's


MEAN_SUMS = SumRule(rounds=(lambda grads, totals: {"sum": grads.sum(dim=0)},),
                    finish=lambda totals: (totals["sum"] / totals["n_envs"], {}))


@COMBINERS.register("mean", reduces_to_mean=lambda: True, sums=MEAN_SUMS)
def mean(grads):
    """Plain averaging, mean_e g_e: empirical risk minimisation over the pooled environments."""
    return MEAN_SUMS.combine(grads)


def _flat(grads):
    return grads.reshape(grads.shape[0], -1)


@COMBINERS.register("align_weights", hparams=[
    HParam("weight_bound", float, 2.0, "Bound b ≥ 1 of the environment weights, which lie in [−b, b] (original: 2).",
           low=1.0)])
def align_weights(grads, weight_bound=2.0):
    """Original GEN-mask: Σ x_e g_e, x = argmax ⟨Σ x_e g_e, Σ g_e⟩, Σx = 1, |x_e| ≤ b (exact LP)."""
    # Parascandolo et al. (ICLR 2021) code, gen_mask_utils. The objective is linear in x, with
    # coefficients c_e = ⟨g_e, Σ g⟩, so the original's per-tensor SLSQP is replaced by the exact
    # sort-based LP solution (`solvers.box_simplex_lp`).
    flat = _flat(grads)
    weights = solvers.box_simplex_lp(flat @ flat.sum(dim=0), total=1.0, bound=weight_bound)
    return (weights @ flat).view(grads.shape[1:]), {"weights": weights}


SAND_THRESHOLD = HParam("agreement_threshold", float, 0.5,
                        "For sand_mask, τ is a soft threshold on the same agreement; τ = 1 masks everything.", low=0.0,
                        high=1.0)
SAND_K = HParam("sand_k", float, 10.0, "Steepness k ≥ 0 of SAND-mask's tanh(k·(a − τ)/Var_e g).", low=0.0)


def _squared_deviations(grads, totals):
    """Σ_e (g_e − ḡ)², ḡ from the first round's sums (two passes, as the variance of one process)."""
    return {"squared_deviations": ((grads - totals["sum"] / totals["n_envs"]) ** 2).sum(dim=0)}


def _sand_mask_update(totals, agreement_threshold=0.5, sand_k=10.0, scale_grad_inverse_sparsity=1):
    if agreement_threshold >= 1:
        warnings.warn("sand_mask with agreement_threshold (τ) = 1 masks every coordinate: tanh(k·(a − τ)/Var) ≤ 0 "
                      "because a ≤ 1, so every update is zero; use τ < 1", UserWarning, stacklevel=4)
    n_envs = totals["n_envs"]
    avg = totals["sum"] / n_envs
    variance = totals["squared_deviations"] / max(n_envs - 1, 1)
    agreement = totals["sign_sum"].abs() / n_envs
    mask = torch.tanh(sand_k * (agreement - agreement_threshold) / variance.clamp_min(1e-17)).clamp_min(0.0)
    update = masks.rescale(mask * avg, mask, scale_grad_inverse_sparsity)
    return update, {"mask": mask}


SAND_MASK_SUMS = SumRule(rounds=(masks.sums_and_signs, _squared_deviations), finish=_sand_mask_update,
                         counts=("sign_sum",))


@COMBINERS.register("sand_mask", hparams=[SAND_THRESHOLD, SAND_K, masks.SCALE_GRAD_INVERSE_SPARSITY],
                    sums=SAND_MASK_SUMS)
def sand_mask(grads, agreement_threshold=0.5, sand_k=10.0, scale_grad_inverse_sparsity=1):
    """SAND-mask: m ⊙ ḡ, m = max(0, tanh(k·(a − τ)/Var_e g)) (Shahtalebi et al., 2021)."""
    # "SAND-mask: An Enhanced Gradient Masking Strategy for the Discovery of Invariances in Domain
    # Generalization", arXiv:2106.02266; as in its DomainBed code: unbiased variance over
    # environments, then the AND-mask's per-tensor rescaling 1/(1e-10 + mean(m)). Since a ≤ 1,
    # τ = 1 gives m = 0 everywhere. A zero variance (one environment, identical environments) is
    # floored at 1e-17, which makes the mask the hard 1[a > τ]. Sums Σg, Σ sign g, then
    # Σ(g − ḡ)²: the environments may be split across processes.
    return SAND_MASK_SUMS.combine(grads, agreement_threshold=agreement_threshold, sand_k=sand_k,
                                  scale_grad_inverse_sparsity=scale_grad_inverse_sparsity)


def _majority_vote_update(totals):
    vote = torch.sign(totals["sign_sum"])
    return vote, {"mask": vote.abs()}


MAJORITY_VOTE_SUMS = SumRule(rounds=(lambda grads, totals: {"sign_sum": masks.sign_sum(grads)},),
                             finish=_majority_vote_update, counts=("sign_sum",))


@COMBINERS.register("majority_vote", keeps_consensus=False, sums=MAJORITY_VOTE_SUMS)
def majority_vote(grads):
    """signSGD with majority vote: sign(Σ_e sign(g_e)) per coordinate (Bernstein et al., ICLR 2019)."""
    # "signSGD with Majority Vote is Communication Efficient and Fault Tolerant". The update has
    # entries in {−1, 0, 1}; a tie (or unanimous zeros) gives 0. The mask marks non-zero votes.
    return MAJORITY_VOTE_SUMS.combine(grads)


@COMBINERS.register("median")
def median(grads):
    """Coordinate-wise median over environments (Yin et al., ICML 2018); mean of the two middle values for even E."""
    # "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".
    ordered = solvers.sort_environments(grads)
    n_envs = grads.shape[0]
    return (ordered[(n_envs - 1) // 2] + ordered[n_envs // 2]) / 2, {}


@COMBINERS.register("trimmed_mean", hparams=[
    HParam("trim_fraction", float, 0.2, "β in [0, 0.49]: drop the floor(β·E) largest and smallest values of each "
           "coordinate.", low=0.0, high=0.49)])
def trimmed_mean(grads, trim_fraction=0.2):
    """Coordinate-wise β-trimmed mean over environments (Yin et al., ICML 2018)."""
    n_envs = grads.shape[0]
    k = int(trim_fraction * n_envs + 1e-9)  # floor(β·E), robust to float rounding (0.29·100)
    return solvers.sort_environments(grads)[k:n_envs - k].mean(dim=0), {}


@COMBINERS.register("pcgrad", scope="model")
def pcgrad(grads):
    """PCGrad gradient surgery: project away conflicts, then average (Yu et al., NeurIPS 2020)."""
    # "Gradient Surgery for Multi-Task Learning". For every environment i, visit the others in a
    # random order; whenever g_i' · g_j < 0, g_i' ← g_i' − (g_i' · g_j)/‖g_j‖² g_j (projection
    # onto the normal plane of the original g_j). Returns mean_i g_i' (the paper sums; the mean
    # keeps the scale of the other rules). Every g_i' is a combination Σ_j A_ij g_j of the original
    # gradients, so the surgery runs on the E×E coefficients A with the Gram matrix Q = G Gᵀ
    # (g_i' · g_j = (AQ)_ij), all environments at once; only the last step touches P numbers.
    n_envs = grads.shape[0]
    gram = grads @ grads.T
    sq_norms = gram.diagonal().clamp_min(1e-30)
    scores = torch.rand(n_envs, n_envs, device=grads.device)
    scores.fill_diagonal_(float("inf"))  # never project onto oneself
    order = torch.argsort(scores, dim=1)[:, :n_envs - 1]
    coefficients = torch.eye(n_envs, dtype=grads.dtype, device=grads.device)
    rows = torch.arange(n_envs, device=grads.device)
    conflicts = torch.zeros((), device=grads.device)
    for step in range(n_envs - 1):
        others = order[:, step]
        dots = (coefficients @ gram)[rows, others]  # g_i' · g_j for j = others[i]
        conflicting = dots < 0
        conflicts = conflicts + conflicting.sum()
        coefficients[rows, others] -= torch.where(conflicting, dots / sq_norms[others], torch.zeros_like(dots))
    return coefficients.mean(dim=0) @ grads, {"conflicts": conflicts}


@COMBINERS.register("mgda", scope="model")
def mgda(grads):
    """MGDA: the minimum-norm point of the convex hull of the g_e (Désidéri 2012; Sener & Koltun, NeurIPS 2018)."""
    # "Multi-Task Learning as Multi-Objective Optimization". Solved exactly on the E×E Gram matrix
    # (`solvers.min_norm_weights`); no gradient normalisation.
    weights = solvers.min_norm_weights(grads @ grads.T)
    return weights @ grads, {"weights": weights}


@COMBINERS.register("cagrad", scope="model", keeps_consensus=False, hparams=[
    HParam("cagrad_c", float, 0.5, "c ≥ 0: the radius c·‖ḡ‖ of the ball around ḡ searched for the worst-case "
           "improvement.", low=0.0),
    HParam("cagrad_rescale", int, 1, "Divide the update by 1 (0), by 1 + c² (1, the authors' choice) or by 1 + c (2).",
           choices=(0, 1, 2))])
def cagrad(grads, cagrad_c=0.5, cagrad_rescale=1):
    """CAGrad: ḡ + c‖ḡ‖ g_w/‖g_w‖, w from CAGrad's dual (Liu et al., NeurIPS 2021)."""
    # "Conflict-Averse Gradient Descent for Multi-task Learning", following the authors' code:
    # w = argmin_{w ∈ simplex} g_w·ḡ + c‖ḡ‖‖g_w‖ (`solvers.cagrad_weights`, exact), then the update
    # is divided by 1 + c² (rescale 1). Identical environments give (1 + c)/(1 + c²)·g, so g itself
    # only with rescale 2. The authors add 1e-8 to ‖g_w‖; here g_w is normalised as it is unless it
    # lies below what the Gram matrix resolves in the gradients' precision (√eps·max_e ‖g_e‖),
    # where its direction is rounding noise and the update is ḡ: the rule is scale-free.
    weights = solvers.cagrad_weights(grads @ grads.T, cagrad_c)
    avg = grads.mean(dim=0)
    g_w = weights @ grads
    norm = g_w.norm()
    resolution = torch.finfo(grads.dtype).eps ** 0.5 * grads.norm(dim=1).max()
    step = torch.where(norm > resolution, cagrad_c * avg.norm() / norm, torch.zeros_like(norm))
    update = avg + step * g_w
    divisor = (1.0, 1.0 + cagrad_c ** 2, 1.0 + cagrad_c)[cagrad_rescale]
    return update / divisor, {"weights": weights}


@COMBINERS.register("gaf", scope="model", hparams=[
    HParam("cos_distance_threshold", float, 1.0, "τ in [0, 2]: fuse an environment when 1 − cos(running, g_e) ≤ τ.",
           low=0.0, high=2.0)])
def gaf(grads, cos_distance_threshold=1.0):
    """Gradient agreement filtering: fuse g_e when its cosine distance is ≤ τ (Chaubard et al., 2024)."""
    # "Beyond Gradient Averaging in Parallel Optimization: Improved Robustness through Gradient
    # Agreement Filtering", arXiv:2412.18052, as in the authors' step_GAF: start from g_1; for
    # e = 2..E, if 1 − cos(g, g_e) ≤ τ then g ← (g + g_e)/2. If no environment agreed the step is
    # skipped, here by returning a zero gradient (an optimiser with momentum or weight decay still
    # moves). With one environment its gradient is returned. Environments are taken in batch
    # order, which the training loop draws at random. The running g = Σ_e a_e g_e is tracked by
    # its coefficients a, so the cosines come from the E×E Gram matrix.
    n_envs = grads.shape[0]
    gram = grads @ grads.T
    eye = torch.eye(n_envs, dtype=grads.dtype, device=grads.device)
    coefficients = eye[0]
    agreed = torch.zeros((), device=grads.device)
    for env in range(1, n_envs):
        fused_sq_norm = coefficients @ gram @ coefficients
        cos = (coefficients @ gram[:, env]) / torch.sqrt(fused_sq_norm * gram[env, env]).clamp_min(1e-30)
        accept = (1 - cos) <= cos_distance_threshold
        coefficients = torch.where(accept, (coefficients + eye[env]) / 2, coefficients)
        agreed = agreed + accept
    if n_envs > 1:
        coefficients = coefficients * (agreed > 0)
    return coefficients @ grads, {"agreed": agreed, "weights": coefficients}


def get_grads(batch_size, n_envs, loss_fn, params, output, target, method="mean", engine="shared", **hyperparameters):
    """Combine per-environment gradients with the registered rule `method`; writes `param.grad`.

    `output`/`target` hold n_envs × batch_size examples stacked env after env, from one forward
    pass. Returns (mean_loss, diagnostics): the mean of the environments' mean losses and one
    diagnostics dict per parameter tensor. Hyper-parameters left out take the combiner's
    defaults; an unknown method or hyper-parameter fails with the valid names. A method that
    needs Hessian-vector products needs the model: use `get_grads_from_model`.
    """
    return combine_output(COMBINERS, method, batch_size, n_envs, loss_fn, params, output, target, engine,
                          hyperparameters)


def get_grads_from_model(model, inputs, target, loss_fn, n_envs, method="mean", engine="auto", chunk_size=None,
                         **hyperparameters):
    """Same as `get_grads` but starting from the model, so the fast engines (and Hessian-vector products) can be used."""
    return combine_model(COMBINERS, method, model, inputs, target, loss_fn, n_envs, engine, chunk_size,
                         hyperparameters)


OBJECTIVES = ObjectiveRegistry({o.name: o for o in baselines.BASELINES})
METHOD_FLAGS = MethodFlags(COMBINERS, required=False, objectives=OBJECTIVES)

PLUGINS_VARIABLE = "GEN_MASK_PLUGINS"


def load_plugins(text: str) -> list[str]:
    """Import the comma-separated modules of `text`, which register methods into COMBINERS or OBJECTIVES.

    Called below with the environment variable GEN_MASK_PLUGINS, so a user's rules in a module of
    their own (on PYTHONPATH) join the registries wherever this module is imported: every
    --method flag, the run modules, the sweeps (their runs inherit the variable) and the
    leaderboard. A module that cannot be imported or registers a taken name ends the process
    with one line.
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            sys.exit(f"error: {PLUGINS_VARIABLE} names {name}, which cannot be imported: {error}")
        except ValueError as error:  # a registry refusing a name taken already
            sys.exit(f"error: the plugin {name} ({PLUGINS_VARIABLE}): {error}")
    return names


PLUGINS = load_plugins(os.environ.get(PLUGINS_VARIABLE, ""))
