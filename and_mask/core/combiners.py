"""Gradient combiners: the rule that turns per-environment gradients into one update.

A combiner is pure math. It receives the per-environment gradients of one parameter tensor
stacked as a tensor of shape (E, *shape) (scope "tensor"), or the flattened gradients of the
whole model stacked as (E, P) (scope "model"), plus its hyper-parameters, and returns the
combined gradient (shape `*shape`, resp. (P,)) and a small dict of diagnostics. A diagnostic
named "mask" (a float tensor of the gradient's shape) is reported as the mask density of that
tensor. Writing `param.grad` happens in one place, `apply_combiner`'s caller.

A model-scope combiner may declare `needs_hvp`: it then also receives `hvp`, a callable giving
each environment's Hessian-vector products at the current parameters, in the flattened layout
of the (E, P) gradients: `hvp(v)` with v of shape (P,) returns the (E, P) rows H_e v, and with
v of shape (E, P) the rows H_e v_e. The caller builds it (the training loop exactly, with
`torch.func`, see `and_mask.core.per_env_hvp`; the 2-D toy from its exact Hessians), so the
combiner stays pure math on tensors.

A tensor-scope combiner may declare a `SumRule`: the rule is then computed from per-coordinate
sums over environments, which lets the environments of a step be split across processes (each
sums over its own, the sums are added up across processes, see `and_mask.core.env_split`).
A combiner that declares nothing is computed from all the per-environment gradients.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from and_mask.core.flags import finite_float
from and_mask.core.per_env_grads import OuterProducts

SCOPES = ("tensor", "model")


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter of a combiner, turned into a command-line flag `--name`."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None  # inclusive bounds, checked before training starts
    high: float | None = None
    choices: tuple | None = None

    def check(self, value) -> str | None:
        """Return an error message if `value` is not allowed (NaN and ±inf never are), else None."""
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return f"--{self.name} must be a finite number, got {value}"
        if self.choices is not None and value not in self.choices:
            return f"--{self.name} must be one of {list(self.choices)}, got {value}"
        if self.low is not None and value < self.low:
            return f"--{self.name} must be >= {self.low}, got {value}"
        if self.high is not None and value > self.high:
            return f"--{self.name} must be <= {self.high}, got {value}"
        return None


@dataclass(frozen=True)
class SumRule:
    """A combiner computed from per-coordinate sums over environments, S = Σ_e f(g_e).

    `rounds` are computed in turn, each `round(grads, totals) -> {name: sum over the environments
    of grads}` with grads of shape (E, *shape) (or OuterProducts, by `outer_rounds`); `totals`
    holds the sums of the earlier rounds over ALL environments and "n_envs", the number of them
    (a variance needs the mean first). `finish(totals, **hparams) -> (combined, diagnostics)`.
    The sums named in `counts` are integers in [−E, E] (counts of signs).
    """

    rounds: tuple[Callable, ...]
    finish: Callable
    outer_rounds: tuple[Callable, ...] | None = None
    counts: tuple[str, ...] = ()

    def round_sums(self, index: int, grads, totals: dict) -> dict:
        """Round `index`'s sums over the environments of `grads` (materialised if the rule has no outer round)."""
        if isinstance(grads, OuterProducts):
            if self.outer_rounds is not None:
                return self.outer_rounds[index](grads, totals)
            grads = grads.materialize()
        return self.rounds[index](grads, totals)

    def combine(self, grads, **hparams):
        """The combined gradient of one tensor's (E, *shape) gradients, all environments at hand."""
        totals = {"n_envs": grads.shape[0]}
        for index in range(len(self.rounds)):
            totals.update(self.round_sums(index, grads, totals))
        return self.finish(totals, **hparams)


class Method:
    """What a combiner and a training objective share: `--method NAME`, a one-line summary (its help)
    from the docstring of what implements it, and hyper-parameters with defaults. Subclasses are
    dataclasses with the fields `name` and `hparams`."""

    def implementation(self) -> Callable:
        raise NotImplementedError

    @property
    def summary(self) -> str:
        doc = (self.implementation().__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def defaults(self) -> dict:
        return {h.name: h.default for h in self.hparams}


@dataclass(frozen=True)
class Combiner(Method):
    """A named combination rule. `fn(grads, **hparams) -> (combined, diagnostics)`."""

    name: str
    fn: Callable
    scope: str = "tensor"
    hparams: tuple[HParam, ...] = ()
    # Given the hyper-parameters, True when the rule is exactly the mean of the per-environment
    # gradients; the training loop then uses one ordinary backward pass of the mean loss.
    reduces_to_mean: Callable[..., bool] = field(default=lambda **hparams: False)
    # True when E identical per-environment gradients g (without zero coordinates), or a single
    # environment, give back g itself; the test suite checks it for every such combiner.
    keeps_consensus: bool = True
    # Optional fast rule for per-example Linear-weight gradients given as OuterProducts
    # (G[i] = δ_i x_iᵀ); it must equal `fn` on the materialised (N, out, in) tensor.
    outer: Callable | None = None
    # Optional: the rule as a function of sums over environments (tensor scope only).
    sums: SumRule | None = None
    # Model scope only: `fn` also takes `hvp=` (see the module docstring), and every caller must supply it.
    needs_hvp: bool = False

    def implementation(self) -> Callable:
        return self.fn


class CombinerRegistry(dict):
    """name -> Combiner. Unknown names fail with the list of valid names."""

    def __missing__(self, name):
        raise KeyError(f"unknown combiner '{name}'; valid names: {', '.join(sorted(self))}")

    def add(self, combiner: Combiner) -> Combiner:
        if combiner.scope not in SCOPES:
            raise ValueError(f"combiner scope must be one of {SCOPES}, got {combiner.scope!r}")
        if combiner.sums is not None and combiner.scope != "tensor":
            raise ValueError(f"combiner '{combiner.name}': only a tensor-scope rule can be a SumRule")
        if combiner.needs_hvp and combiner.scope != "model":
            raise ValueError(f"combiner '{combiner.name}' needs Hessian-vector products, which only a model-scope "
                             "combiner can take")
        if combiner.name in self:
            raise ValueError(f"a combiner named '{combiner.name}' is already registered")
        self[combiner.name] = combiner
        return combiner

    def register(self, name: str, scope: str = "tensor", hparams=(), reduces_to_mean=None, keeps_consensus=True,
                 needs_hvp=False, sums: SumRule | None = None):
        """Decorator: `@COMBINERS.register("my_rule", hparams=[HParam(...)])` on `fn(grads, **hp)`."""

        def decorate(fn):
            extra = {} if reduces_to_mean is None else {"reduces_to_mean": reduces_to_mean}
            self.add(Combiner(name=name, fn=fn, scope=scope, hparams=tuple(hparams), keeps_consensus=keeps_consensus,
                              needs_hvp=needs_hvp, sums=sums, **extra))
            return fn

        return decorate


def _materialize(grads):
    return grads.materialize() if isinstance(grads, OuterProducts) else grads


def apply_combiner(combiner: Combiner, per_env_grads: list[torch.Tensor], hparams: dict, hvp: Callable | None = None):
    """Combine a list of per-environment gradients, one (E, *shape) tensor per parameter.

    `hvp` (only for a combiner that `needs_hvp`, which fails without it) gives the environments'
    Hessian-vector products in the layout of the flattened gradients, parameter after parameter.

    A Linear weight's per-example gradients may come factored as OuterProducts (the `outer`
    engine): the combiner's `outer` rule takes them as they are, any other rule sees them
    materialised.

    Returns (list of combined gradients, list of per-tensor diagnostics dicts). A model-scope
    combiner sees the concatenation of all flattened tensors and its diagnostics are repeated
    for every tensor, with the mask (if any) split back per tensor.
    """
    if combiner.scope == "tensor":
        results = [combiner.outer(g, **hparams) if isinstance(g, OuterProducts) and combiner.outer
                   else combiner.fn(_materialize(g), **hparams) for g in per_env_grads]
        return [r[0] for r in results], [r[1] for r in results]
    if combiner.needs_hvp:
        if hvp is None:
            raise ValueError(f"combiner '{combiner.name}' needs the environments' Hessian-vector products: pass hvp")
        hparams = {**hparams, "hvp": hvp}
    per_env_grads = [_materialize(g) for g in per_env_grads]
    n_envs = per_env_grads[0].shape[0]
    flat = torch.cat([g.reshape(n_envs, -1) for g in per_env_grads], dim=1)
    combined, diagnostics = combiner.fn(flat, **hparams)
    sizes = [g[0].numel() for g in per_env_grads]
    pieces = torch.split(combined, sizes)
    grads = [p.view(g.shape[1:]) for p, g in zip(pieces, per_env_grads)]
    mask = diagnostics.get("mask")
    masks = torch.split(mask, sizes) if mask is not None else [None] * len(sizes)
    per_tensor = []
    for m, g in zip(masks, per_env_grads):
        d = {k: v for k, v in diagnostics.items() if k != "mask"}
        if m is not None:
            d["mask"] = m.view(g.shape[1:])
        per_tensor.append(d)
    return grads, per_tensor


def resolve_hparams(method, hyperparameters: dict) -> dict:
    """A method's hyper-parameters (a Combiner's or an Objective's): the given ones over its defaults,
    each checked; ValueError naming an unknown or impossible one."""
    known = {h.name for h in method.hparams}
    unknown = set(hyperparameters) - known
    if unknown:
        raise ValueError(f"{', '.join(sorted(unknown))} not hyper-parameter(s) of '{method.name}'; "
                         f"its hyper-parameters: {', '.join(sorted(known)) or 'none'}")
    hparams = {**method.defaults(), **hyperparameters}
    for hp in method.hparams:
        problem = hp.check(hparams[hp.name])
        if problem:
            raise ValueError(problem)
    return hparams


class MethodFlags:
    """Command-line flags that choose a combiner and set its hyper-parameters.

    With `required=True` (the and_mask package, as in the original code) every hyper-parameter
    flag must be given. Otherwise (gen_mask) a flag left out takes the chosen combiner's default.
    A flag shared by several combiners (e.g. --agreement_threshold) is declared once.
    """

    def __init__(self, registry: CombinerRegistry, required: bool = False, default_method: str | None = None,
                 objectives: dict | None = None):
        self.registry = registry
        self.required = required
        self.default_method = default_method
        # Training objectives (`and_mask.core.objectives`): a second kind of method, same name space.
        self.objectives = objectives if objectives is not None else {}

    def entry(self, name: str):
        """The Combiner or Objective called `name`."""
        return self.objectives[name] if name in self.objectives else self.registry[name]

    def add_flags(self, parser: argparse.ArgumentParser):
        clashes = set(self.registry) & set(self.objectives)
        if clashes:
            raise ValueError(f"names registered both as combiner and as objective: {', '.join(sorted(clashes))}")
        names = sorted([*self.registry, *self.objectives])
        group = parser.add_argument_group("gradient combination")
        group.add_argument("--method", choices=names, required=self.default_method is None,
                           default=self.default_method, help="The rule that combines the per-environment gradients "
                           "(a combiner) or the training objective. "
                           + " ".join(f"{n}: {self.entry(n).summary.rstrip('.')}." for n in names))
        declared = {}
        for name in names:
            for hp in self.entry(name).hparams:
                declared.setdefault(hp.name, (hp, []))[1].append(name)
        for flag, (hp, users) in declared.items():
            helps = dict.fromkeys(h.help for u in users for h in self.entry(u).hparams if h.name == flag)
            text = f"{' '.join(helps)} Used by {', '.join(users)}."
            if not self.required:
                text += " Default: the chosen method's own value (" + ", ".join(
                    f"{u} {self.entry(u).defaults()[flag]}" for u in users) + ")."
            group.add_argument(f"--{flag}", type=finite_float if hp.type is float else hp.type,
                               required=self.required, default=None, help=text)
        self._declared = declared

    def resolve(self, args, parser) -> tuple:
        """(the Combiner or Objective named by --method, its hyper-parameters)."""
        combiner = self.entry(args.method)
        given = {hp.name: getattr(args, hp.name) for hp in combiner.hparams if getattr(args, hp.name) is not None}
        try:
            hparams = resolve_hparams(combiner, given)
        except ValueError as problem:
            parser.error(str(problem))
        for flag, (hp, users) in self._declared.items():
            if getattr(args, flag) is not None and combiner.name not in users and not self.required:
                parser.error(f"--{flag} is not a hyper-parameter of --method {combiner.name} "
                             f"(it belongs to {', '.join(users)})")
        return combiner, hparams
