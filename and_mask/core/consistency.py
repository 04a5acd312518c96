"""A lower bound on the inconsistency I^ε of a trained model, by constrained ascent along paths.

Definitions (Parascandolo et al., ICLR 2021, Section 2), for trained weights θ* and ε > 0:
N^ε_{e,θ*} is the largest path-connected set containing θ* on which |L_e(θ) − L_e(θ*)| ≤ ε, and

    I^ε(θ*) = max over ordered pairs (e, e′) ∈ E² of max_{θ ∈ N^ε_{e,θ*}} |L_e′(θ) − L_e(θ*)|

(pairs e = e′ included, as in the paper; they contribute at most ε). ILC = −E[I^ε].

On a trained ReLU network the ε-region is unbounded (paths reach weights of any size, where L_e′
can grow without limit), and a lower bound on I^ε keeps growing with the search budget. Restricted
to a ball the quantity is determined. For a radius ρ > 0,

    B_ρ(θ*) = {θ : ‖θ_t − θ*_t‖ ≤ ρ·‖θ*_t‖ for every parameter tensor t}  (the "relative" metric),
    B_ρ(θ*) = {θ : ‖θ − θ*‖ ≤ ρ}                                           (the "euclidean" metric),

N^ε_{e,θ*,ρ} is the path-connected component containing θ* of {θ ∈ B_ρ(θ*) : |L_e(θ) − L_e(θ*)| ≤ ε}, and

    I^ε_ρ(θ*) = max over ordered pairs (e, e′) of max_{θ ∈ N^ε_{e,θ*,ρ}} |L_e′(θ) − L_e(θ*)|,

a maximum over a compact set, hence finite; I^ε_ρ ≤ I^ε, and I^ε_ρ → I^ε as ρ → ∞.

The estimate. For every ordered pair (e, e′) and every restart, a path θ_0 = θ*, θ_1, ... is
grown by proposals of length at most `step_length`, in one of two metrics (`metric`):
"euclidean", the L2 norm over all trainable parameters, or "relative" (the default), in which
tensor t counts ‖Δθ_t‖ / ‖θ*_t‖: per tensor, relative to its size at θ*, so that a length means
the same in a network whose layers were rescaled against each other (ReLU layers multiplied by α
and 1/α compute the same function) and in networks of different weight scales. The search runs
on the variables u_t = θ_t / ‖θ*_t‖ (a tensor that is zero at θ* stays fixed), where that metric
is Euclidean and gradients are taken with respect to u:

- direction: the ascent direction a = ∇L_e′ (c = L_e(θ*)); within 5 % of ε of the
  constraint's edge, a minus its component along b = ∇|L_e − c| when that component points out
  (the step is tangent to the level set of L_e); restart r > 0 follows a fixed random Gaussian
  direction (instead of a) for its first quarter of proposals, so that it starts its ascent from
  another point of the region. Paths climb L_e′: for non-negative losses (all of this
  repository's) the side below c is worth at most c, which is small at a trained minimum;
- step: h along that unit direction, then, if the first-order prediction of |L_e − c| exceeds
  0.99 ε, a move back along b to that level; the whole step is cut to length h;
- a proposal is accepted only if |L_e(θ) − c| ≤ ε there, both losses are finite, and (past the
  random start) L_e′ did not decrease; otherwise h is halved and the path tries again from where
  it is (after an accepted step h doubles again, up to `step_length`). A path stops after
  `steps` proposals, or when h falls below step_length / 1024;
- with a radius ρ (`radius`), each proposal is first projected onto B_ρ(θ*): in u the ball is a
  product of Euclidean balls of radius ρ, one per tensor (relative metric), or one ball of
  radius ρ (euclidean), and a displacement u − u* longer than ρ is scaled back to length ρ. A
  path that reaches the surface slides along it. The projection onto a convex set holding the
  current point never lengthens the step, whose length is measured after it.

The value of a pair is the largest |L_e′(θ) − c| over the accepted points of its paths, θ*
included. Every accepted point satisfies the constraint and consecutive accepted points are at
most `step_length` apart, so the accepted points trace a path inside N^ε_{e,θ*} up to the path's
discretisation (the segments between accepted points are not checked): the value is a lower
bound on max_{θ ∈ N^ε_{e,θ*}} |L_e′(θ) − c|, and the largest value over pairs a lower bound on
I^ε(θ*), up to that discretisation. A small budget gives a weak bound, never an overestimate.
With a radius every accepted point also lies in B_ρ(θ*) (the ball is convex, so the segments
do too): the value is a lower bound on I^ε_ρ(θ*), in the same sense.

Losses are those of the model in eval mode on the first `examples_per_env` examples of each
training environment's dataset, in the dataset's order (all of them when 0), as one batch,
with the training loop's loss function.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils.data import BatchSampler, DataLoader, Subset

from and_mask.core.errors import RunError
from and_mask.core.flags import non_negative_int, positive_float, positive_int

LOWER_BOUND_NOTE = ("a lower bound on I^eps up to the path's discretisation: every evaluated point of every path "
                    "satisfies |L_e - L_e(theta*)| <= eps and consecutive points are at most step_length apart; the "
                    "segments between them are not checked")
EDGE_BAND = 0.05  # within this fraction of ε of the constraint's edge, steps follow the level set
TARGET = 0.99  # the level (fraction of ε) that the first-order correction aims for
MAX_HALVINGS = 10
PATHS_PER_BATCH = 32  # paths advanced together (vmapped); bounds memory
METRICS = ("relative", "euclidean")
READ_BATCH = 1024  # examples read at once from an environment's dataset


@dataclass(frozen=True)
class SearchSettings:
    """The search budget (see the module docstring)."""

    steps: int = 50  # proposals per path
    step_length: float = 0.02  # largest distance between consecutive points of a path
    metric: str = "relative"  # how distances are measured: "relative" or "euclidean"
    restarts: int = 2  # paths per ordered pair: the plain ascent, then restarts with a random start
    examples_per_env: int = 256  # the fixed subset of each environment; 0: all of it
    seed: int = 0  # seeds the random directions of the restarts
    radius: float | None = None  # ρ: paths stay in the ball B_ρ(θ*), in the metric's sense; None: no ball


def add_search_flags(parser: argparse.ArgumentParser, prefix: str = ""):
    """--{prefix}steps, --{prefix}step_length, --{prefix}metric, --{prefix}restarts, --{prefix}examples_per_env,
    --{prefix}radius."""
    defaults = SearchSettings()
    parser.add_argument(f"--{prefix}steps", type=positive_int, default=defaults.steps,
                        help="Proposals per path of the constrained ascent (the step budget of each path).")
    parser.add_argument(f"--{prefix}step_length", type=positive_float, default=defaults.step_length,
                        help="Largest distance, in the metric of --" + prefix + "metric, between consecutive points "
                             "of a path.")
    parser.add_argument(f"--{prefix}metric", choices=METRICS, default=defaults.metric,
                        help="How path lengths are measured: relative counts each parameter tensor's change "
                             "relative to its norm at the trained weights (unchanged when layers are rescaled "
                             "against each other); euclidean is the L2 norm over all trainable parameters.")
    parser.add_argument(f"--{prefix}restarts", type=positive_int, default=defaults.restarts,
                        help="Paths per ordered pair of environments: one plain ascent, the others first walk "
                             "along a random direction.")
    parser.add_argument(f"--{prefix}examples_per_env", type=non_negative_int, default=defaults.examples_per_env,
                        help="Examples of each training environment (the first ones, in the dataset's order) "
                             "whose mean loss is L_e; 0: all of them.")
    parser.add_argument(f"--{prefix}radius", type=positive_float, default=defaults.radius,
                        help="ρ: bound I^ε_ρ instead, the maximum over the part of the ε-region connected to θ* "
                             "within the ball B_ρ(θ*): every parameter tensor within ρ times its norm at θ* "
                             "(relative metric), or ‖θ − θ*‖ ≤ ρ (euclidean). Unlike I^ε it is finite: a maximum "
                             "over a compact set. Default: none, no ball (I^ε itself).")


def settings_from_args(args, prefix: str = "", seed: int = 0) -> SearchSettings:
    return SearchSettings(getattr(args, f"{prefix}steps"), getattr(args, f"{prefix}step_length"),
                          getattr(args, f"{prefix}metric"), getattr(args, f"{prefix}restarts"),
                          getattr(args, f"{prefix}examples_per_env"), seed, getattr(args, f"{prefix}radius"))


def check_env_loaders(env_loaders):
    if not env_loaders:
        raise RunError("the consistency estimate needs each training environment's data, and this experiment "
                       "exposes none (TrainSetup.env_loaders)")


def env_data(env_loaders, max_examples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of the first `max_examples` (0: all) examples of each loader's dataset.

    A loader without a batch size reads a dataset indexed by lists of positions (a batch at a
    time, as Colored MNIST's); it is read the same way here. The readers draw their base seed
    from a private generator: an iterator of a DataLoader otherwise draws from the global random
    generator, which would change a training run that follows.
    """
    check_env_loaders(env_loaders)
    data = []
    for loader in env_loaders:
        dataset = loader.dataset
        positions = range(len(dataset) if max_examples == 0 else min(max_examples, len(dataset)))
        if loader.batch_size is None:
            reader = DataLoader(dataset, sampler=BatchSampler(positions, READ_BATCH, drop_last=False), batch_size=None,
                                generator=torch.Generator())
        else:
            reader = DataLoader(Subset(dataset, positions), batch_size=READ_BATCH, generator=torch.Generator())
        batches = list(reader)
        data.append((torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])))
    return data


def final_metrics(setup, eps: float, settings: SearchSettings):
    """For the training loop: model → {"inconsistency": the lower bound, "consistency": details}."""
    check_env_loaders(setup.env_loaders)  # before training, so that a run without the data fails early

    def metrics(model) -> dict:
        estimate = estimate_inconsistency(model, env_data(setup.env_loaders, settings.examples_per_env),
                                          setup.loss_fn, eps, settings)
        return {"inconsistency": estimate.lower_bound, "consistency": estimate.record()}
    return metrics


@dataclass
class ConsistencyEstimate:
    eps: float
    settings: SearchSettings
    reference_losses: list  # L_e(θ*) per environment
    values: torch.Tensor  # (E, E): lower bound on max_{N^ε_{e,θ*}} |L_e′ − L_e(θ*)| (N^ε_{e,θ*,ρ}: ρ set), rows e
    path_lengths: torch.Tensor  # (E, E): length of the path up to the point that gives the value
    best_restarts: torch.Tensor  # (E, E): the restart that gives it
    seconds: float  # time the search took
    weights_norm: float  # ‖θ*‖ over the trainable parameters: the scale the step length is measured against
    # (e, e′) → (length, L_e, L_e′[, parameters]) after each proposal of its best path, NaN if rejected
    traces: dict = field(repr=False, default_factory=dict)

    @property
    def lower_bound(self) -> float:
        return float(self.values.max())

    @property
    def pair(self) -> tuple[int, int]:
        flat = int(self.values.argmax())
        return divmod(flat, self.values.shape[1])

    def record(self) -> dict:
        """The JSON form (environments numbered from 1, as env1, env2, ...)."""
        e, other = self.pair
        n_envs = self.values.shape[0]
        return {"eps": self.eps, "lower_bound": self.lower_bound, "pair": [e + 1, other + 1], "note": LOWER_BOUND_NOTE,
                "settings": asdict(self.settings), "seconds": self.seconds, "weights_norm": self.weights_norm,
                "reference_losses": self.reference_losses,
                "pairs": [{"env": i + 1, "other_env": j + 1, "value": float(self.values[i, j]),
                           "path_length": float(self.path_lengths[i, j]), "restart": int(self.best_restarts[i, j])}
                          for i in range(n_envs) for j in range(n_envs)]}


def _batched_loss(model: nn.Module, loss_fn):
    """(params, buffers, inputs, target) → loss, for torch.func; the output flattened as in `evaluate`."""
    def loss(params, buffers, inputs, target):
        output = functional_call(model, (params, buffers), (inputs,))
        return loss_fn(output.reshape(output.shape[0], -1).squeeze(-1), target)
    return vmap(grad_and_value(loss), in_dims=(0, None, 0, 0))


def _per_path(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *[1] * (like.dim() - 1))


def _dot(a: dict, b: dict) -> torch.Tensor:
    return sum((a[n] * b[n]).reshape(a[n].shape[0], -1).sum(1) for n in a)


def _axpy(alpha: torch.Tensor, x: dict, y: dict) -> dict:
    """y + alpha·x, one alpha per path."""
    return {n: y[n] + _per_path(alpha, y[n]) * x[n] for n in y}


def _scale(alpha: torch.Tensor, x: dict) -> dict:
    return {n: _per_path(alpha, x[n]) * x[n] for n in x}


def _where(mask: torch.Tensor, x: dict, y: dict) -> dict:
    return {n: torch.where(_per_path(mask, y[n]), x[n], y[n]) for n in y}


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)  # sign(0) = +1: at θ* the upper edge is the near one


def _flat(theta: dict) -> torch.Tensor:
    return torch.cat([p.reshape(p.shape[0], -1) for p in theta.values()], dim=1)


def _into_ball(theta: dict, star: dict, units: dict, radius: float, per_tensor: bool) -> dict:
    """The nearest point of B_ρ(θ*) in u = θ / units: θ* + d·min(1, ρ·unit / ‖d‖), d = θ − θ*, per tensor
    (relative metric, unit = ‖θ*_t‖) or over all of them (euclidean, unit = 1). Points inside are returned
    as they are (bit for bit)."""
    groups = [[n] for n in theta] if per_tensor else [list(theta)]
    projected = {}
    for names in groups:
        shift = {n: theta[n] - star[n] for n in names}
        norm, limit = _dot(shift, shift).sqrt(), radius * units[names[0]]
        outside = norm > limit  # never for a tensor that is zero at θ*: it does not move
        factor = torch.where(outside, limit / norm.clamp_min(1e-30), 1.0)
        projected.update(_where(outside, _axpy(factor, shift, {n: star[n] for n in names}),
                                {n: theta[n] for n in names}))
    return projected


def _search(grad_loss, theta: dict, units: dict, buffers, data, envs, others, eps, settings, random_dirs, explore,
            keep_points=False):
    """Grow one batch of paths from θ* = `theta` (see the module docstring).

    The search runs in u = θ / `units` (per tensor), where lengths are Euclidean.
    `envs`, `others`: (P,) the pair (e, e′) of each path; `random_dirs`: unit directions (in u)
    followed for the first `explore` (P,) proposals. Returns the reference c = L_e(θ*), the
    best |L_e′ − c| of each path, the path length up to it, and the trace [(length, L_e, L_e′)
    after each proposal; NaN where rejected]. With `settings.radius` the proposals are projected
    onto B_ρ(θ*).
    """
    inputs, targets = data
    x_e, y_e, x_o, y_o = inputs[envs], targets[envs], inputs[others], targets[others]

    def evaluate(params):
        g_e, l_e = grad_loss(params, buffers, x_e, y_e)
        g_o, l_o = grad_loss(params, buffers, x_o, y_o)
        return (l_e.detach(), {n: g.detach() * units[n] for n, g in g_e.items()}, l_o.detach(),
                {n: g.detach() * units[n] for n, g in g_o.items()})  # gradients with respect to u

    star = theta
    loss_e, grad_e, loss_o, grad_o = evaluate(theta)
    reference = loss_e.clone()
    best = (loss_o - reference).abs()
    best_length, length = torch.zeros_like(best), torch.zeros_like(best)
    step = torch.full_like(best, settings.step_length)
    alive = torch.ones_like(best, dtype=torch.bool)
    trace = [(length.clone(), loss_e.clone(), loss_o.clone()) + ((_flat(theta),) if keep_points else ())]
    for t in range(settings.steps):
        level = (loss_e - reference).abs()
        b = _scale(_sign(loss_e - reference), grad_e)  # ∇|L_e − c|, pointing out of the region
        exploring = t < explore
        a = _where(exploring, random_dirs, grad_o)
        ab, bb = _dot(a, b), _dot(b, b).clamp_min(1e-30)
        outward = (level > (1 - EDGE_BAND) * eps) & (ab > 0)
        a = _axpy(torch.where(outward, -ab / bb, 0.0), b, a)  # near the edge: tangent to the level set
        a_norm = _dot(a, a).sqrt()
        alive &= a_norm > 0
        move = _scale(step / a_norm.clamp_min(1e-30), a)
        # First-order level after the move; if above TARGET·ε, move back along b to it.
        predicted = level + _dot(b, move)
        pull = torch.where(predicted > TARGET * eps, (TARGET * eps - predicted) / bb, 0.0)
        move = _axpy(pull, b, move)
        norm = _dot(move, move).sqrt()
        move = _scale(torch.where(norm > step, step / norm.clamp_min(1e-30), 1.0), move)
        norm = torch.minimum(norm, step)
        proposal = _axpy(alive.to(step.dtype), {n: m * units[n] for n, m in move.items()}, theta)
        if settings.radius is not None:
            proposal = _into_ball(proposal, star, units, settings.radius, settings.metric == "relative")
            # The step actually taken, in u (a tensor that is zero at θ* has unit 0 and does not move).
            taken = {n: (proposal[n] - theta[n]) / units[n].clamp_min(1e-30) for n in theta}
            norm = _dot(taken, taken).sqrt()
        new_e, new_grad_e, new_o, new_grad_o = evaluate(proposal)
        feasible = ((new_e - reference).abs() <= eps) & torch.isfinite(new_e) & torch.isfinite(new_o)
        # Past its random start a path only climbs: a step that loses ground overshot, and is halved.
        climbs = exploring | (new_o >= loss_o)
        accept = alive & feasible & climbs
        theta, grad_e, grad_o = _where(accept, proposal, theta), _where(accept, new_grad_e, grad_e), \
            _where(accept, new_grad_o, grad_o)
        loss_e, loss_o = torch.where(accept, new_e, loss_e), torch.where(accept, new_o, loss_o)
        length = length + torch.where(accept, norm, 0.0)
        gap = (loss_o - reference).abs()
        better = accept & (gap > best)
        best, best_length = torch.where(better, gap, best), torch.where(better, length, best_length)
        step = torch.where(accept, (2 * step).clamp_max(settings.step_length), step / 2)
        alive &= step >= settings.step_length / 2 ** MAX_HALVINGS
        trace.append((length.clone(), torch.where(accept, loss_e, torch.nan), torch.where(accept, loss_o, torch.nan))
                     + ((torch.where(accept[:, None], _flat(theta), torch.nan),) if keep_points else ()))
        if not alive.any():
            break
    return reference, best, best_length, trace


def estimate_inconsistency(model: nn.Module, data: list, loss_fn, eps: float,
                           settings: SearchSettings = SearchSettings(), keep_points: bool = False
                           ) -> ConsistencyEstimate:
    """Lower bound on I^ε at the model's current weights θ* (on I^ε_ρ with `settings.radius` = ρ), whose
    environments' data are `data` [(inputs, targets) per environment, all of the same size]. The model is
    left unchanged.
    With `keep_points` each trace also holds the path's parameters (trainable ones, flattened in
    the order of `named_parameters`), for checking."""
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if settings.metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {settings.metric!r}")
    if settings.radius is not None and not 0 < settings.radius < float("inf"):
        raise ValueError(f"radius must be a positive finite number or None, got {settings.radius}")
    sizes = {len(y) for _, y in data}
    if len(sizes) != 1:
        raise RunError(f"every environment needs the same number of examples for the consistency estimate, got "
                       f"{sorted(sizes)}; set the number of examples per environment")
    n_envs, started = len(data), time.time()
    device = next(model.parameters()).device
    inputs = torch.stack([x for x, _ in data]).to(device)
    targets = torch.stack([y for _, y in data]).to(device)
    was_training = model.training
    model.eval()
    try:
        star = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        buffers = {**dict(model.named_buffers()), **frozen}
        grad_loss = _batched_loss(model, loss_fn)
        units = {n: p.norm() if settings.metric == "relative" else torch.ones((), dtype=p.dtype, device=p.device)
                 for n, p in star.items()}
        reference = [0.0] * n_envs
        pairs = [(e, o, r) for r in range(settings.restarts) for e in range(n_envs) for o in range(n_envs)]
        generator = torch.Generator().manual_seed(settings.seed)
        values = torch.full((settings.restarts, n_envs, n_envs), -1.0, dtype=torch.float64)
        lengths = torch.zeros_like(values)
        traces = {}
        for start in range(0, len(pairs), PATHS_PER_BATCH):
            batch = pairs[start:start + PATHS_PER_BATCH]
            envs = torch.tensor([e for e, _, _ in batch], device=device)
            others = torch.tensor([o for _, o, _ in batch], device=device)
            restart = torch.tensor([r for _, _, r in batch], device=device)
            random_dirs = _random_directions(star, len(batch), generator, restart > 0)
            explore = torch.where(restart > 0, settings.steps // 4, 0)
            theta = {n: p.expand(len(batch), *p.shape).clone() for n, p in star.items()}
            start_losses, best, length, trace = _search(grad_loss, theta, units, buffers, (inputs, targets), envs,
                                                        others, eps, settings, random_dirs, explore, keep_points)
            for i, (e, o, r) in enumerate(batch):
                reference[e] = float(start_losses[i])
                values[r, e, o], lengths[r, e, o] = float(best[i]), float(length[i])
                traces[(e, o, r)] = tuple(torch.stack([step[k][i] for step in trace]).cpu()
                                          for k in range(len(trace[0])))
    finally:
        model.train(was_training)
    best_restart = values.argmax(0)
    pick = best_restart[None]
    return ConsistencyEstimate(eps, settings, reference, values.gather(0, pick)[0],
                               lengths.gather(0, pick)[0], best_restart, time.time() - started,
                               float(_flat({n: p[None] for n, p in star.items()}).norm()),
                               {(e, o): traces[(e, o, int(best_restart[e, o]))]
                                for e in range(n_envs) for o in range(n_envs)})


def _random_directions(like: dict, n_paths: int, generator, used: torch.Tensor) -> dict:
    """Gaussian directions of unit L2 norm over all parameters, one per path (zero where not used)."""
    dirs = {n: torch.randn((n_paths, *p.shape), generator=generator, dtype=p.dtype).to(p.device)
            for n, p in like.items()}
    norm = _dot(dirs, dirs).sqrt()
    return _scale(used.to(norm.dtype) / norm, dirs)
