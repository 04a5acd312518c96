"""Proposition 2 / Fig. 4: the AND-masked mean of random Gaussian gradients shrinks exponentially.

python -m and_mask.paper.masked_noise --out figures/masked_noise

Setting (the paper's Appendix A.4): n parameters, d environments (or examples) whose gradients
g_1..g_d are i.i.d. N(0, σ² I_n); ḡ = mean_e g_e. The AND-mask m_t keeps a coordinate when at
least t of the d signs agree (t > d/2); in the code's terms τ = (2t − d)/d, i.e. |mean_e sign| ≥ τ.
Fig. 4 uses n = 3000 and t = 0.8 d (τ = 0.6).

Closed forms, per coordinate, with K ~ Binomial(d, 1/2) the number of positive signs:
- E‖ḡ‖² = n σ² / d (averaging);
- P(kept) = p_t = 2^(1−d) Σ_{k=t..d} C(d, k);
- given K = k the d values are independent half-normals with signs fixed, so
  E[(Σ_e g_e)² | K = k] = σ² (d (1 − 2/π) + (2k − d)² 2/π), hence
  E‖m_t ⊙ ḡ‖² = (n σ² / d²) 2^(1−d) Σ_{k=t..d} C(d, k) (d (1 − 2/π) + (2k − d)² 2/π).
The proof bounds E[ḡ_j² | K] by σ², giving E‖m_t ⊙ ḡ‖² ≤ n σ² p_t, and then prints the last
step as σ² n (d − t) C(d, t) 2^(1−d); the sum it bounds has d − t + 1 terms, not d − t, so the
printed form is 0, below the true value, at t = d (for t = 0.8 d: d ≤ 4). Both are drawn.
The Monte Carlo estimate uses the project's own mask (`and_mask_utils.agreement_mask`).
"""
from __future__ import annotations

import argparse
import math
from fractions import Fraction

import numpy as np
import torch

from and_mask.and_mask_utils import agreement_mask
from and_mask.core.figures import add_output_flags, claim_figures, figure, run_cli, save
from and_mask.core.flags import entry_parser, positive_float, positive_int, positive_list, seed_int

FIG4_ENVS = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 40, 50, 64, 80, 100, 128, 160, 200)


def agreeing_signs(d: int, fraction: float) -> int:
    """t = ⌈fraction · d⌉, computed exactly (0.8 · 15 is 12, not 13)."""
    return math.ceil(Fraction(str(fraction)) * d)


def tau_of(d: int, t: int) -> float:
    """The code's threshold τ = (2t − d)/d: |mean_e sign(g_e)| ≥ τ exactly when ≥ t signs agree."""
    return (2 * t - d) / d


def _weights(d: int, t: int):
    """(k, P(K = k) + P(K = d − k)) for k = t..d: the two sign patterns that keep a coordinate."""
    return [(k, math.comb(d, k) / 2 ** (d - 1)) for k in range(t, d + 1)]


def keep_probability(d: int, t: int) -> float:
    """p_t = P(at least t of d symmetric signs agree), t > d/2."""
    return sum(w for _, w in _weights(d, t))


def mean_sq_norm(n: int, d: int, sigma: float = 1.0) -> float:
    """E‖ḡ‖² = n σ² / d."""
    return n * sigma ** 2 / d


def masked_sq_norm(n: int, d: int, t: int, sigma: float = 1.0) -> float:
    """E‖m_t ⊙ ḡ‖², exact (module docstring)."""
    per_coordinate = sum(w * (d * (1 - 2 / math.pi) + (2 * k - d) ** 2 * 2 / math.pi) for k, w in _weights(d, t))
    return n * sigma ** 2 * per_coordinate / d ** 2


def proof_bound(n: int, d: int, t: int, sigma: float = 1.0) -> float:
    """The proof's bound n σ² p_t (each kept coordinate's E[ḡ_j² | K] ≤ σ²)."""
    return n * sigma ** 2 * keep_probability(d, t)


def printed_bound(n: int, d: int, t: int, sigma: float = 1.0) -> float:
    """The proof's last line as printed: σ² n (d − t) C(d, t) 2^(1−d)."""
    return sigma ** 2 * n * (d - t) * math.comb(d, t) / 2 ** (d - 1)


def sample(n: int, d: int, t: int, sigma: float, repeats: int, generator: torch.Generator) -> dict:
    """Monte Carlo: `repeats` draws of d gradients in R^n; returns per-draw ‖ḡ‖², ‖m ⊙ ḡ‖², kept fraction."""
    tau = tau_of(d, t)
    average, masked, kept = [], [], []
    for _ in range(repeats):
        grads = sigma * torch.randn(d, n, generator=generator, dtype=torch.float64)
        mean = grads.mean(dim=0)
        mask = agreement_mask(grads, tau)
        average.append(float(mean.square().sum()))
        masked.append(float((mask * mean).square().sum()))
        kept.append(float(mask.mean()))
    return {"average": np.array(average), "masked": np.array(masked), "kept": np.array(kept)}


def analyse(n: int, envs, fraction: float, sigma: float, repeats: int, seed: int) -> list[dict]:
    """One row per d: closed forms, bounds and the Monte Carlo means with their standard errors."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for d in envs:
        t = agreeing_signs(d, fraction)
        draws = sample(n, d, t, sigma, repeats, generator)
        row = {"d": d, "t": t, "tau": tau_of(d, t), "keep_probability": keep_probability(d, t),
               "mean_sq_norm": mean_sq_norm(n, d, sigma), "masked_sq_norm": masked_sq_norm(n, d, t, sigma),
               "proof_bound": proof_bound(n, d, t, sigma), "printed_bound": printed_bound(n, d, t, sigma)}
        for key, values in draws.items():
            row[f"mc_{key}"] = float(values.mean())
            row[f"mc_{key}_se"] = float(values.std(ddof=1) / math.sqrt(repeats)) if repeats > 1 else float("nan")
        rows.append(row)
    return rows


def table(rows, n: int, fraction: float, sigma: float, repeats: int) -> str:
    lines = [f"Random gradients g_e ~ N(0, {sigma:g}² I), n = {n} parameters, t = ⌈{fraction:g} d⌉ agreeing signs; "
             f"Monte Carlo over {repeats} draws (mean ± standard error).", "",
             "| d | t | τ | kept fraction p_t | E‖ḡ‖² | MC | E‖m⊙ḡ‖² (exact) | MC | bound n σ² p_t "
             "| printed bound | printed ≥ exact |", "|---" * 11 + "|"]
    for r in rows:
        lines.append(f"| {r['d']} | {r['t']} | {r['tau']:.3f} | {r['keep_probability']:.3e} | {r['mean_sq_norm']:.4g} "
                     f"| {r['mc_average']:.4g} ± {r['mc_average_se']:.2g} | {r['masked_sq_norm']:.4g} "
                     f"| {r['mc_masked']:.4g} ± {r['mc_masked_se']:.2g} | {r['proof_bound']:.4g} "
                     f"| {r['printed_bound']:.4g} | {'yes' if r['printed_bound'] >= r['masked_sq_norm'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(rows, args):
    d = np.array([r["d"] for r in rows])
    fig, axes = figure(1, 2, f"Random Gaussian gradients, n = {args.n_params}, t = ⌈{args.agreement_fraction:g} d⌉")
    ax = axes[0, 0]
    ax.plot(d, [r["mean_sq_norm"] for r in rows], color="C0", label="average: n σ²/d")
    ax.plot(d, [r["masked_sq_norm"] for r in rows], color="C1", label="AND-mask: exact")
    ax.plot(d, [r["proof_bound"] for r in rows], "--", color="C2", label="bound n σ² p_t")
    printed = np.array([r["printed_bound"] for r in rows])
    ax.plot(d[printed > 0], printed[printed > 0], ":", color="C3", label="bound as printed")
    ax.plot(d, [r["mc_average"] for r in rows], "o", color="C0", markersize=4, label="average: Monte Carlo")
    masked = np.array([r["mc_masked"] for r in rows])
    ax.plot(d[masked > 0], masked[masked > 0], "o", color="C1", markersize=4, label="AND-mask: Monte Carlo (> 0)")
    ax.set(xscale="log", yscale="log", xlabel="number of environments (examples) d", ylabel="E‖update‖²",
           title="squared norm of the update")
    ax.legend(fontsize="small")
    ax = axes[0, 1]
    ax.plot(d, [r["keep_probability"] for r in rows], color="C1", label="exact p_t")
    kept = np.array([r["mc_kept"] for r in rows])
    ax.plot(d[kept > 0], kept[kept > 0], "o", color="C1", markersize=4, label="Monte Carlo (> 0)")
    ax.set(xscale="log", yscale="log", xlabel="number of environments (examples) d", ylabel="fraction kept",
           title="coordinates the AND-mask keeps")
    ax.legend(fontsize="small")
    for ax in axes.flat:
        ax.grid(alpha=0.3, which="both")
    return save(fig, args, "masked_noise")


def fraction_above_half(text):
    value = float(text)
    if not 0.5 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0.5, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser("and_mask.paper.masked_noise", __doc__)
    parser.add_argument("--n_params", type=positive_int, default=3000, help="Parameters n (the paper's |θ|).")
    parser.add_argument("--envs", type=positive_list(positive_int, "numbers of environments"), default=FIG4_ENVS,
                        help="Comma-separated numbers of environments d, each at least 2.")
    parser.add_argument("--agreement_fraction", type=fraction_above_half, default=0.8,
                        help="t/d: a coordinate is kept when at least ⌈fraction · d⌉ signs agree (the paper: 0.8).")
    parser.add_argument("--sigma", type=positive_float, default=1.0, help="Standard deviation σ of every gradient entry.")
    parser.add_argument("--repeats", type=positive_int, default=100, help="Monte Carlo draws per d.")
    parser.add_argument("--seed", type=seed_int, default=0, help="Seed of the Monte Carlo draws.")
    add_output_flags(parser)
    return parser


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.envs) < 2:
        parser.error("--envs: every number of environments must be at least 2")
    figures = claim_figures(args, "and_mask.paper.masked_noise", ["masked_noise"])
    rows = analyse(args.n_params, args.envs, args.agreement_fraction, args.sigma, args.repeats, args.seed)
    text = table(rows, args.n_params, args.agreement_fraction, args.sigma, args.repeats)
    figures.publish(text, "masked_noise", plot(rows, args))
    return rows


if __name__ == "__main__":
    run_cli(main)
