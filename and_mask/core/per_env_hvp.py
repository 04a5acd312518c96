"""Per-environment Hessian-vector products, exact, with `torch.func`: what a `needs_hvp` combiner gets.

With the trainable parameters θ flattened to P numbers (parameter after parameter, as the
combiners see the gradients) and H_e = ∇²_θ L_e(θ) the Hessian of environment e's mean loss at
the current θ, `env_hvp(...)` returns the callable

    hvp(v) -> (E, P):   rows H_e v for v of shape (P,),   rows H_e v_e for v of shape (E, P).

Each product is forward-over-reverse, the directional derivative of the gradient along v,
jvp(∇_θ L_e, v): exact (no finite differences), at a few times the cost of the gradient. Two
paths, chosen like the gradient engine (`per_env_grads.resolve_engine`) so that the Hessians are
those of the very losses whose gradients were combined:

- per environment (engines vmap and outer, and every engine when the examples do not interact):
  `vmap` over environments of jvp(grad(L_e)) on environment e's own B examples.
- shared graph (BatchNorm in training mode with the shared or loop engine, where every
  environment's loss depends on the whole batch through its statistics): L(θ) = (L_1, ..., L_E)
  from one forward pass over all E·B examples; environment e's gradient is the vector-Jacobian
  product of L with the unit vector e, and its product with v the jvp of that, vmapped over e.

BatchNorm running statistics are left alone (the gradient pass of the step updates them once).
Active dropout is refused: every product would draw new masks, so the products would not belong
to the losses whose gradients were taken.

Distributed training, environments split across ranks: rank r builds this callable on the batch
of its own environments E_r and computes their rows; a shared v (P,) is the same on every rank
(it is built from the gathered gradients), of a per-environment v (E, P) each rank takes its own
rows; the (E, P) result is the all_gather of the per-rank (E_r, P) pieces in environment order.
A shared-graph model (BatchNorm over the whole batch) cannot be split that way.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from and_mask.core.per_env_grads import (
    batch_statistics_only,
    couples_examples,
    env_blocks,
    env_losses_from_output,
    functional_env_loss,
    functional_model,
    has_active_dropout,
    resolve_engine,
)


def hvp_from_hessians(hessians: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """hvp(v) -> (E, P) from explicit (E, P, P) Hessians, for problems small enough to hold them
    (the 2-D toy landscapes, tests): rows H_e v for v (P,), H_e v_e for v (E, P)."""
    def hvp(v):
        return torch.einsum("eij,j->ei" if v.dim() == 1 else "eij,ej->ei", hessians, v)
    return hvp


def hvp_unsupported(model: nn.Module) -> str | None:
    """Why exact Hessian-vector products of this model's per-environment losses cannot be had, or None."""
    if has_active_dropout(model):
        return "Hessian-vector products need a deterministic model, but dropout is active (train with dropout 0)"
    return None


def env_hvp(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, loss_fn, n_envs: int, engine: str = "auto",
            chunk_size: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """hvp(v) -> (E, P) at the model's current parameters (see the module docstring).

    `inputs` holds E·B examples stacked env after env; `engine` and `chunk_size` (environments
    per vectorised pass, to bound memory) are those of the gradients."""
    problem = hvp_unsupported(model)
    if problem:
        raise ValueError(problem)
    params, call = functional_model(model)
    names = list(params)
    sizes = [params[n].numel() for n in names]
    per_env = resolve_engine(model, engine, inputs.shape[0], n_envs, accepts_outer=True) in ("vmap", "outer")
    if per_env or not couples_examples(model):
        env_loss = functional_env_loss(call, loss_fn)
        env_inputs, env_targets = env_blocks(inputs, target, n_envs)

        def product(tangent, x, y):
            def env_grad(p):
                return grad(env_loss, has_aux=True)(p, x, y)[0]
            return jvp(env_grad, (params,), (tangent,))[1]

        sources = (env_inputs, env_targets)
    else:
        def losses(p):
            return env_losses_from_output(call(p, inputs), target, loss_fn, n_envs)

        def product(tangent, unit):
            def env_grad(p):
                return vjp(losses, p)[1](unit)[0]
            return jvp(env_grad, (params,), (tangent,))[1]

        dtype = next(iter(params.values())).dtype
        sources = (torch.eye(n_envs, dtype=dtype, device=inputs.device),)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        shared = v.dim() == 1
        pieces = torch.split(v, sizes, dim=-1)
        tangent = {n: piece.reshape(*v.shape[:-1], *params[n].shape) for n, piece in zip(names, pieces)}
        with batch_statistics_only(model), warnings.catch_warnings():
            # forward-mode AD loads its decompositions through the deprecated torch.jit.script on first
            # use: torch's own warning, nothing the caller can act on
            warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
            out = vmap(product, in_dims=(None if shared else 0,) + (0,) * len(sources),
                       chunk_size=chunk_size)(tangent, *sources)
        return torch.cat([out[n].reshape(n_envs, -1) for n in names], dim=1)

    return hvp
