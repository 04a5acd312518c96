"""Per-environment gradients: one place, three engines, all equal to the plain loop.

The batch holds E environments of B examples each, stacked env after env: environment e is
rows [e*B, (e+1)*B). For every trainable parameter θ we need the (E, *θ.shape) tensor
G[e] = ∇_θ L_e, where L_e = loss_fn(output_e, target_e) is environment e's mean loss.

Engines:
- ``loop``   the original: one forward pass over all E*B examples, then E calls of
             ``torch.autograd.grad`` through the shared graph. Reference for correctness.
- ``shared`` the same forward pass, then the E backward passes vectorised over environments
             (``is_grads_batched``), in chunks of ``chunk_size`` environments to bound memory.
             Exact whenever examples interact through the batch, e.g. BatchNorm in training mode
             normalising with the statistics of all E*B examples. Each backward pass runs over
             all E*B rows, so the cost is inherently about E plain backward passes; batching
             them pays off on CUDA (fewer kernel launches). On the CPU the batched backward is
             memory-bound and measured slower than one pass at a time
             (tests/benchmarks/bench_grads.py), so there the default chunk is 1 environment.
- ``vmap``   ``torch.func.vmap`` of ``grad`` over environments: each environment is its own
             forward/backward on B examples. Exact only when examples do not interact; with
             BatchNorm in training mode each environment would be normalised with its own
             statistics, which changes the model, so ``auto`` never picks it then.
- ``auto``   ``vmap`` when that is exact (no BatchNorm in training mode, no active dropout whose
             random draws would differ from the shared forward pass), else ``shared``.

Outputs are reshaped exactly as the original ``get_grads`` did:
``output.view(E, B, -1).squeeze(-1)``, and the same for the target, so a model with one logit
per example works with 1-D targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

ENGINES = ("auto", "vmap", "shared", "loop")


@dataclass
class PerEnvGrads:
    env_losses: torch.Tensor  # (E,) detached
    grads: list  # one (E, *param.shape) tensor per trainable parameter
    output: torch.Tensor  # (E*B, ...) model output, detached


def _split_envs(tensor: torch.Tensor, n_envs: int) -> torch.Tensor:
    if tensor.shape[0] % n_envs:
        raise ValueError(f"a batch of {tensor.shape[0]} examples cannot be split into {n_envs} environments")
    return tensor.reshape(n_envs, tensor.shape[0] // n_envs, -1).squeeze(-1)


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def couples_examples(model: nn.Module) -> bool:
    """True when a training-mode forward pass makes one example's output depend on the others."""
    return any(_is_batchnorm(m) and m.training for m in model.modules())


def has_active_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in model.modules())


def resolve_engine(model: nn.Module, engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown gradient engine '{engine}'; valid: {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    return "shared" if couples_examples(model) or has_active_dropout(model) else "vmap"


def env_losses_from_output(output, target, loss_fn, n_envs):
    """(E,) tensor of per-environment mean losses of a stacked output (keeps the graph)."""
    outputs, targets = _split_envs(output, n_envs), _split_envs(target, n_envs)
    return torch.stack([loss_fn(o, t) for o, t in zip(outputs, targets)])


def grads_from_output(env_losses, params, engine="shared", chunk_size=None):
    """Per-environment gradients of `env_losses` (E,) w.r.t. `params` through a shared graph."""
    params = list(params)
    n_envs = env_losses.shape[0]
    if engine == "loop":
        chunk_size = 1
    elif engine != "shared":
        raise ValueError(f"engine '{engine}' cannot work from a finished forward pass; use 'shared' or 'loop'")
    if chunk_size is None:
        chunk_size = n_envs if env_losses.is_cuda else 1
    if chunk_size == 1:
        per_env = [torch.autograd.grad(env_losses[e], params, retain_graph=True) for e in range(n_envs)]
        return [torch.stack(gs) for gs in zip(*per_env)]
    chunk = min(chunk_size, n_envs)
    eye = torch.eye(n_envs, dtype=env_losses.dtype, device=env_losses.device)
    pieces = []
    for start in range(0, n_envs, chunk):
        rows = eye[start:start + chunk]
        pieces.append(torch.autograd.grad(env_losses, params, grad_outputs=rows,
                                          is_grads_batched=True, retain_graph=True))
    if len(pieces) == 1:
        return list(pieces[0])
    return [torch.cat(gs) for gs in zip(*pieces)]


def _vmap_grads(model, inputs, target, loss_fn, n_envs, chunk_size):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in named}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    batch = inputs.shape[0] // n_envs
    env_inputs = inputs.reshape(n_envs, batch, *inputs.shape[1:])
    env_targets = target.reshape(n_envs, batch, *target.shape[1:])

    def env_loss(p, x, y):
        out = functional_call(model, ({**p, **frozen}, buffers), (x,))
        return loss_fn(out.reshape(batch, -1).squeeze(-1), y.reshape(batch, -1).squeeze(-1)), out

    bns = [m for m in model.modules() if _is_batchnorm(m) and m.training and m.track_running_stats]
    for m in bns:  # per-environment batch statistics; running statistics updated below
        m.track_running_stats = False
    try:
        grads, (losses, outs) = vmap(grad_and_value(env_loss, has_aux=True), in_dims=(None, 0, 0),
                                     randomness="different", chunk_size=chunk_size)(params, env_inputs, env_targets)
    finally:
        for m in bns:
            m.track_running_stats = True
    if bns:  # opt-in only: keep the running statistics of a plain training step
        with torch.no_grad():
            model(inputs)
    return losses.detach(), [grads[n] for n, _ in named], outs.reshape(inputs.shape[0], *outs.shape[2:]).detach()


def per_env_grads(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, loss_fn, n_envs: int,
                  engine: str = "auto", chunk_size: int | None = None) -> PerEnvGrads:
    """Forward `inputs` (E*B examples, env after env) and return each environment's gradient."""
    engine = resolve_engine(model, engine)
    if engine == "vmap":
        losses, grads, output = _vmap_grads(model, inputs, target, loss_fn, n_envs, chunk_size)
        return PerEnvGrads(losses, grads, output)
    output = model(inputs)
    env_losses = env_losses_from_output(output, target, loss_fn, n_envs)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = grads_from_output(env_losses, params, engine=engine, chunk_size=chunk_size)
    return PerEnvGrads(env_losses.detach(), grads, output.detach())
