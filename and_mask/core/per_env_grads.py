"""Per-environment gradients: one place, four engines, all equal to the plain loop.

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
- ``outer``  one example per environment and every trainable parameter in an ``nn.Linear``
             (logistic regression, MLPs without BatchNorm): one forward and one backward pass of
             Σ_i L_i give each layer's inputs x_i and output gradients δ_i, and example i's
             gradient is δ_i (bias) and the outer product δ_i x_iᵀ (weight). Weight gradients are
             returned factored as ``OuterProducts``, so a combiner with an ``outer`` rule (AND-mask:
             mean_i sign(δ_i x_iᵀ) = sign(Δ)ᵀ sign(X) / N) never builds the N × out × in tensor;
             other combiners get it materialised. Exact under the same conditions as ``vmap``.
- ``auto``   ``outer`` when the caller accepts factored gradients and it applies; else ``vmap``
             when that is exact (no BatchNorm in training mode, no active dropout whose random
             draws would differ from the shared forward pass); else ``shared``.

Outputs are reshaped exactly as the original ``get_grads`` did:
``output.view(E, B, -1).squeeze(-1)``, and the same for the target, so a model with one logit
per example works with 1-D targets.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

ENGINES = ("auto", "outer", "vmap", "shared", "loop")


@dataclass
class PerEnvGrads:
    env_losses: torch.Tensor  # (E,) detached
    grads: list  # one (E, *param.shape) tensor (or OuterProducts) per trainable parameter
    output: torch.Tensor  # (E*B, ...) model output, detached


@dataclass
class OuterProducts:
    """Per-example gradients of a Linear weight kept factored: G[i] = δ_i x_iᵀ, shape (N, out, in)."""

    output_grads: torch.Tensor  # Δ, (N, out)
    inputs: torch.Tensor  # X, (N, in)

    @property
    def shape(self):
        return torch.Size((self.inputs.shape[0], self.output_grads.shape[1], self.inputs.shape[1]))

    def mean(self) -> torch.Tensor:
        """mean_i δ_i x_iᵀ = ΔᵀX / N."""
        return self.output_grads.T @ self.inputs / self.inputs.shape[0]

    def materialize(self) -> torch.Tensor:
        return torch.einsum("no,ni->noi", self.output_grads, self.inputs)


def split_envs(tensor: torch.Tensor, n_envs: int) -> torch.Tensor:
    """(E·B, ...) stacked env after env → (E, B, ...), as the original: `view(E, B, -1).squeeze(-1)`."""
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


def outer_applies(model: nn.Module, n_examples: int, n_envs: int) -> bool:
    """One example per environment, independent examples, and only nn.Linear parameters."""
    linear_params = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    return (n_examples == n_envs and not couples_examples(model) and not has_active_dropout(model)
            and all(id(p) in linear_params for p in model.parameters() if p.requires_grad))


def resolve_engine(model: nn.Module, engine: str, n_examples: int | None = None, n_envs: int | None = None,
                   accepts_outer: bool = False) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown gradient engine '{engine}'; valid: {', '.join(ENGINES)}")
    outer = accepts_outer and n_examples is not None and outer_applies(model, n_examples, n_envs)
    if engine == "outer" and not outer:
        raise ValueError("the outer engine needs one example per environment, a model whose trainable parameters "
                         "all sit in nn.Linear layers (no BatchNorm, no active dropout), and a caller that accepts "
                         "factored gradients")
    if engine != "auto":
        return engine
    if outer:
        return "outer"
    return "shared" if couples_examples(model) or has_active_dropout(model) else "vmap"


def env_losses_from_output(output, target, loss_fn, n_envs):
    """(E,) tensor of per-environment mean losses of a stacked output (keeps the graph)."""
    outputs, targets = split_envs(output, n_envs), split_envs(target, n_envs)
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


@contextmanager
def batch_statistics_only(model: nn.Module):
    """Training-mode BatchNorm layers normalise with their batch's statistics but leave their running
    statistics alone (as under `torch.func` transforms they must). Yields whether there were any."""
    bns = [m for m in model.modules() if _is_batchnorm(m) and m.training and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield bool(bns)
    finally:
        for m in bns:
            m.track_running_stats = True


def functional_model(model: nn.Module):
    """(trainable parameters by name, detached; `call(params, x)`: the model's forward with those)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def call(p, x):
        return functional_call(model, ({**p, **frozen}, buffers), (x,))

    return params, call


def env_blocks(inputs: torch.Tensor, target: torch.Tensor, n_envs: int):
    """Inputs and targets reshaped to (E, B, ...), one block per environment."""
    batch = inputs.shape[0] // n_envs
    return inputs.reshape(n_envs, batch, *inputs.shape[1:]), target.reshape(n_envs, batch, *target.shape[1:])


def functional_env_loss(call, loss_fn):
    """`env_loss(params, x, y) -> (L_e, output)` for one environment's block of examples."""
    def env_loss(p, x, y):
        out = call(p, x)
        batch = x.shape[0]
        return loss_fn(out.reshape(batch, -1).squeeze(-1), y.reshape(batch, -1).squeeze(-1)), out

    return env_loss


def _vmap_grads(model, inputs, target, loss_fn, n_envs, chunk_size):
    params, call = functional_model(model)
    env_inputs, env_targets = env_blocks(inputs, target, n_envs)
    with batch_statistics_only(model) as has_bns:  # per-environment batch statistics
        grads, (losses, outs) = vmap(grad_and_value(functional_env_loss(call, loss_fn), has_aux=True),
                                     in_dims=(None, 0, 0), randomness="different",
                                     chunk_size=chunk_size)(params, env_inputs, env_targets)
    if has_bns:  # opt-in only: keep the running statistics of a plain training step
        with torch.no_grad():
            model(inputs)
    return losses.detach(), [grads[n] for n in params], outs.reshape(inputs.shape[0], *outs.shape[2:]).detach()


def _outer_grads(model, inputs, target, loss_fn, n_envs):
    captured = {}

    def keep(module, args, output):
        if module in captured or args[0].dim() != 2:
            raise ValueError("the outer engine needs every nn.Linear called once per forward on 2-D inputs")
        captured[module] = (args[0].detach(), output)

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(keep) for m in linears]
    try:
        output = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    env_losses = env_losses_from_output(output, target, loss_fn, n_envs)
    used = [m for m in linears if m in captured]
    # Each example is its own environment and examples do not interact, so the gradient of
    # Σ_i L_i with respect to a layer's output row i is example i's own δ_i.
    deltas = torch.autograd.grad(env_losses.sum(), [captured[m][1] for m in used])
    factors = {}
    for module, delta in zip(used, deltas):
        factors[id(module.weight)] = OuterProducts(delta, captured[module][0])
        if module.bias is not None:
            factors[id(module.bias)] = delta
    grads = [factors[id(p)] for p in model.parameters() if p.requires_grad]
    return PerEnvGrads(env_losses.detach(), grads, output.detach())


def _no_envs(model: nn.Module, engine: str) -> PerEnvGrads:
    """The gradients of zero environments (a process given none of a step's), in the engine's layout."""
    factored = {}
    if engine == "outer":
        for m in model.modules():
            if isinstance(m, nn.Linear):
                factored[id(m.weight)] = OuterProducts(m.weight.new_zeros(0, m.out_features),
                                                       m.weight.new_zeros(0, m.in_features))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [factored.get(id(p), p.new_zeros(0, *p.shape)) for p in params]
    empty = params[0].new_zeros(0)
    return PerEnvGrads(empty, grads, empty)


def per_env_grads(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, loss_fn, n_envs: int,
                  engine: str = "auto", chunk_size: int | None = None, accepts_outer: bool = False,
                  envs: range | None = None) -> PerEnvGrads:
    """Forward `inputs` (E*B examples, env after env) and return each environment's gradient.

    With `accepts_outer` the caller can take Linear-weight gradients as `OuterProducts`
    (`apply_combiner` does), which lets `auto` pick the `outer` engine. `envs` (the shared and
    loop engines only) back-propagates only those environments' losses through the forward pass
    of the whole batch: the gradients then have len(envs) rows, while `env_losses` and `output`
    still cover the whole batch (a process's share of a step split across processes).
    """
    engine = resolve_engine(model, engine, inputs.shape[0], n_envs, accepts_outer)
    if envs is not None and engine not in ("shared", "loop"):
        raise ValueError(f"envs= needs the shared or loop engine, which forward the whole batch; got {engine}")
    if n_envs == 0:
        return _no_envs(model, engine)
    if engine == "outer":
        return _outer_grads(model, inputs, target, loss_fn, n_envs)
    if engine == "vmap":
        losses, grads, output = _vmap_grads(model, inputs, target, loss_fn, n_envs, chunk_size)
        return PerEnvGrads(losses, grads, output)
    output = model(inputs)
    env_losses = env_losses_from_output(output, target, loss_fn, n_envs)
    params = [p for p in model.parameters() if p.requires_grad]
    own = env_losses if envs is None else env_losses[envs.start:envs.stop]
    grads = (grads_from_output(own, params, engine=engine, chunk_size=chunk_size) if len(own)
             else _no_envs(model, engine).grads)
    return PerEnvGrads(env_losses.detach(), grads, output.detach())
