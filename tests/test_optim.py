"""AdamFlexibleWeightDecay against torch's Adam and the decoupled-decay formula."""
import math

import pytest
import torch

from and_mask.core.optim import AdamFlexibleWeightDecay


def run(optimizer_factory, steps=5, seed=0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    grads = [torch.randn(6, dtype=torch.float64) for _ in range(steps)]
    opt = optimizer_factory([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), grads


def test_before_equals_torch_adam_with_coupled_weight_decay():
    ours, _ = run(lambda ps: AdamFlexibleWeightDecay(ps, lr=0.1, weight_decay=0.3, weight_decay_order="before"))
    torchs, _ = run(lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.3))
    assert torch.allclose(ours, torchs, rtol=1e-12, atol=1e-12)


def test_after_applies_bias_corrected_decoupled_decay():
    lr, wd, b1, b2, eps = 0.1, 0.3, 0.9, 0.999, 1e-8
    ours, grads = run(lambda ps: AdamFlexibleWeightDecay(ps, lr=lr, weight_decay=wd, weight_decay_order="after"))
    torch.manual_seed(0)
    theta = torch.randn(6, dtype=torch.float64)
    m = torch.zeros(6, dtype=torch.float64)
    v = torch.zeros(6, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = lr / (1 - b1 ** t)
        theta = theta - step * m / (v.sqrt() / math.sqrt(1 - b2 ** t) + eps)
        theta = theta - step * wd * theta
    assert torch.allclose(ours, theta, rtol=1e-12, atol=1e-12)


def test_weight_decay_order_is_required():
    with pytest.raises(TypeError):
        AdamFlexibleWeightDecay([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="weight_decay_order"):
        AdamFlexibleWeightDecay([torch.nn.Parameter(torch.zeros(1))], lr=0.1, weight_decay_order="sometimes")
