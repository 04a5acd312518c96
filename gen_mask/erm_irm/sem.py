"""The four linear structural-equation models of the benchmark of Ahuja et al. (ICLR 2021).

Row vectors of 5 dimensions each; environment e has noise scale σ_e ∈ {0.2, 2.0}:

    h = N(0, σ²I)                                  hidden confounder
    x = h·W_hx + N(0, σ²I)                         causal features
    y = x·W_xy + h·W_hy + N(0, σ²I)                outcome, 5-dimensional
    z = y·W_yz + h·W_hz + N(0, I)                  non-causal features (children of y)
    features = [x, z] (10 columns), target = Σ_j y_j

Every W is randn(5, 5)/10, drawn once per trial. Setups: CS has neither a hidden confounder nor a
child (W_yz = 0), CF a hidden confounder, AC a child, HB both. Without a hidden confounder
W_hx = I and W_hy = W_hz = 0 (h is then only extra noise on x).

Ground truth. The causal coefficients are w* = [W_xy·1, 0] (1 the all-ones vector): the target's
structural equation in x, zero weight on z. The benchmark's error is ‖ŵ − w*‖² over the 10
features. z is not invariant: its noise does not scale with σ_e while y's does, so its relation
to the target changes between environments. With a hidden confounder the best predictor from x
alone, E[target | x] = x·(W_xy·1 + B·W_hy·1) with B = (AᵀA + I)⁻¹Aᵀ and A = W_hx (the
regression of h on x, the same for every σ since h and x's noise scale together), is also
invariant but differs from w*; its error ‖w_inv − w*‖² is reported as the optimum (0 for CS and
AC, of order 1e-3 for CF and HB).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gen_mask.erm_irm.fit import Problem, trial_seed

SETUPS = {"sem_cs": (False, False), "sem_cf": (True, False), "sem_ac": (False, True), "sem_hb": (True, True)}
ENV_SIGMAS = (0.2, 2.0)
BLOCK = 5  # dimensions of h, x, y and z


@dataclass
class LinearSEM:
    w_hx: torch.Tensor
    w_hy: torch.Tensor
    w_hz: torch.Tensor
    w_xy: torch.Tensor
    w_yz: torch.Tensor

    @classmethod
    def draw(cls, name: str, generator: torch.Generator) -> "LinearSEM":
        """The SEM `name` (sem_cs, sem_cf, sem_ac or sem_hb) with weights randn/10 from `generator`."""
        hidden, child = SETUPS[name]

        def randn():
            return torch.randn(BLOCK, BLOCK, generator=generator, dtype=torch.float64) / (2 * BLOCK)

        zeros = torch.zeros(BLOCK, BLOCK, dtype=torch.float64)
        w_xy = randn()
        w_yz = randn() if child else zeros
        if hidden:
            w_hx, w_hy, w_hz = randn(), randn(), randn()
        else:
            w_hx, w_hy, w_hz = torch.eye(BLOCK, dtype=torch.float64), zeros, zeros.clone()
        return cls(w_hx=w_hx, w_hy=w_hy, w_hz=w_hz, w_xy=w_xy, w_yz=w_yz)

    def sample(self, n: int, sigma: float, generator: torch.Generator):
        """(features (n, 10) = [x, z], target (n,)) of the environment with noise scale σ, float64."""
        def noise(scale):
            return torch.randn(n, BLOCK, generator=generator, dtype=torch.float64) * scale

        h = noise(sigma)
        x = h @ self.w_hx + noise(sigma)
        y = x @ self.w_xy + h @ self.w_hy + noise(sigma)
        z = y @ self.w_yz + h @ self.w_hz + noise(1.0)
        return torch.cat([x, z], dim=1), y.sum(dim=1)

    def causal_coefficients(self) -> torch.Tensor:
        """w* = [W_xy·1, 0] (10,): the ground truth of the benchmark's error ‖ŵ − w*‖²."""
        return torch.cat([self.w_xy.sum(dim=1), torch.zeros(BLOCK, dtype=torch.float64)])

    def invariant_coefficients(self) -> torch.Tensor:
        """[W_xy·1 + (AᵀA + I)⁻¹Aᵀ·W_hy·1, 0] with A = W_hx: E[target | x], the same in every environment."""
        a = self.w_hx
        confounding = torch.linalg.solve(a.T @ a + torch.eye(BLOCK, dtype=torch.float64), a.T @ self.w_hy.sum(dim=1))
        return self.causal_coefficients() + torch.cat([confounding, torch.zeros(BLOCK, dtype=torch.float64)])

    def optimal_error(self) -> float:
        """‖w_inv − w*‖²: the error of the best invariant predictor that uses only x."""
        return float((self.invariant_coefficients() - self.causal_coefficients()).pow(2).sum())


def compress(features: torch.Tensor, target: torch.Tensor):
    """d + 1 pseudo-examples with the same mean squared error as (features, target) for every w.

    With A = [X, y] (n × (d+1)) and A = QR, (1/n)‖Xw − y‖² = (1/n)‖A[w; −1]‖² = (1/n)‖R[w; −1]‖²,
    so the rows of R·sqrt((d+1)/n) are d+1 examples whose mean squared error, its gradient and
    the IRMv1 penalty (also a function of AᵀA) equal those of the n originals. Full-batch fits
    then cost the same for every n.
    """
    n, d = features.shape
    gram_root = torch.linalg.qr(torch.cat([features, target[:, None]], dim=1), mode="r").R
    if gram_root.shape[0] < d + 1:  # fewer examples than columns: pad with zero rows
        gram_root = torch.cat([gram_root, gram_root.new_zeros(d + 1 - gram_root.shape[0], d + 1)])
    gram_root = gram_root * (d + 1) ** 0.5 / n ** 0.5
    return gram_root[:, :d], gram_root[:, d]


class StackedLinear(nn.Module):
    """M independent linear models without bias, output[:, m] = x[:, m] · w_m; every w_m starts at 0."""

    def __init__(self, n_models: int, n_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_models, n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, M, d) -> (B, M)
        return torch.einsum("bmd,md->bm", x, self.weight)


def squared_risk(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the examples (dim 0), one value per model."""
    return (output - target).pow(2).mean(dim=0)


def sem_problem(name: str, pairs: list, seed: int, val_fraction: float) -> tuple[Problem, list]:
    """The SEM `name` for each (n per environment, trial) pair, fitted full-batch side by side.

    Returns (Problem, optimal errors). Trial t draws its weights from (seed, t), the same for
    every n, and its data from (seed, t, n). Each environment's n examples are shuffled and split
    into training and validation parts (val_fraction); validation pools both environments' parts.
    """
    train_x, train_y, val_x, val_y, w_star, optima = [], [], [], [], [], []
    for n_per_env, trial in pairs:
        sem = LinearSEM.draw(name, torch.Generator().manual_seed(trial_seed(seed, trial)))
        data = torch.Generator().manual_seed(trial_seed(seed, trial, n_per_env))
        n_val = int(round(val_fraction * n_per_env))
        envs, vals = [], []
        for sigma in ENV_SIGMAS:
            x, y = sem.sample(n_per_env, sigma, data)
            order = torch.randperm(n_per_env, generator=data)
            envs.append(compress(x[order[n_val:]], y[order[n_val:]]))
            vals.append((x[order[:n_val]], y[order[:n_val]]))
        train_x.append(torch.cat([e[0] for e in envs]))
        train_y.append(torch.cat([e[1] for e in envs]))
        vx, vy = compress(torch.cat([v[0] for v in vals]), torch.cat([v[1] for v in vals]))
        val_x.append(vx)
        val_y.append(vy)
        w_star.append(sem.causal_coefficients())
        optima.append(sem.optimal_error())
    inputs, target = torch.stack(train_x, 1).float(), torch.stack(train_y, 1).float()  # (E·(d+1), T, d), (E·(d+1), T)
    val_inputs, val_target = torch.stack(val_x, 1).float(), torch.stack(val_y, 1).float()
    w_star = torch.stack(w_star).float()
    n_models, n_features = len(pairs), inputs.shape[-1]
    problem = Problem(
        make_model=lambda: StackedLinear(n_models, n_features),
        stacked=True,
        risk=squared_risk,
        batch=lambda step: (inputs, target),
        n_envs=len(ENV_SIGMAS),
        validation_loss=lambda model: squared_risk(model(val_inputs), val_target),
        test_error=lambda model: (model.weight - w_star).pow(2).sum(dim=1),
        squared_norm=lambda model: model.weight.pow(2).sum(dim=1),
    )
    return problem, optima
