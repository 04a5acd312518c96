"""AdamFlexibleWeightDecay against torch's Adam and the decoupled-decay formula; temporal AND-mask Adam."""
import math

import pytest
import torch

from and_mask.core.optim import AdamFlexibleWeightDecay, TemporalAndMaskAdam


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


def run_sequence(optimizer, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach().clone() for p in params]


def random_problem(seed=0, steps=6):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,)]
    start = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes] for _ in range(steps)]
    return start, grads


def fresh(start):
    return [torch.nn.Parameter(t.clone()) for t in start]


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_temporal_mask_at_tau_0_is_adam_step_for_step(weight_decay):
    start, grads = random_problem()
    for t in range(1, len(grads) + 1):
        ours, reference = fresh(start), fresh(start)
        temporal = TemporalAndMaskAdam(ours, lr=0.1, beta3=0.9, temporal_threshold=0.0, weight_decay=weight_decay)
        flexible = AdamFlexibleWeightDecay(reference, lr=0.1, weight_decay=weight_decay, weight_decay_order="after")
        for a, b in zip(run_sequence(temporal, ours, grads[:t]), run_sequence(flexible, reference, grads[:t])):
            assert torch.equal(a, b)  # the same bias-corrected step, bit for bit
    ours, reference = fresh(start), fresh(start)
    run_sequence(TemporalAndMaskAdam(ours, lr=0.1, beta3=0.5, temporal_threshold=0.0), ours, grads)
    run_sequence(torch.optim.Adam(reference, lr=0.1, foreach=False), reference, grads)
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, rtol=1e-14, atol=1e-14)


def one_coordinate_run(signs, threshold, beta3=0.9):
    """Positions of a scalar parameter after each step, its gradients having the given signs."""
    p = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    opt = TemporalAndMaskAdam([p], lr=0.1, beta3=beta3, temporal_threshold=threshold)
    positions = []
    for sign in signs:
        p.grad = torch.tensor(sign * 0.5, dtype=torch.float64)
        opt.step()
        positions.append(float(p.detach()))
    return positions


def alternating_bound(beta3):
    """max over t ≥ 2 of |â_t| for signs +, −, +, …: reached at t = 3."""
    return (1 + beta3 ** 3) / ((1 + beta3) * (1 + beta3 + beta3 ** 2))


@pytest.mark.parametrize("beta3", [0.5, 0.9, 0.99])
def test_an_alternating_sign_is_frozen_after_its_first_step(beta3):
    signs = [(-1) ** t for t in range(40)]
    positions = one_coordinate_run(signs, alternating_bound(beta3) + 1e-9, beta3)
    assert positions[0] != 0 and len(set(positions)) == 1  # moved at step 1 only
    # the bound is tight: just below it the third step passes
    positions = one_coordinate_run(signs, alternating_bound(beta3) - 1e-6, beta3)
    assert positions[1] == positions[0] and positions[2] != positions[1]


@pytest.mark.parametrize("threshold", [0.3, 1.0])
def test_a_constant_sign_is_updated_at_every_step(threshold):
    positions = one_coordinate_run([1.0] * 30, threshold)
    assert all(b < a for a, b in zip([0.0] + positions, positions))  # it moves (down) at every step


def test_one_sign_change_blocks_tau_1_for_good_and_weight_decay_is_never_masked():
    positions = one_coordinate_run([1.0] * 5 + [-1.0] + [1.0] * 20, 1.0)
    assert len(set(positions[4:])) == 1  # from the change on, never unanimous again
    p = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
    opt = TemporalAndMaskAdam([p], lr=0.1, beta3=0.9, temporal_threshold=1.0, weight_decay=0.5)
    for sign in (1, -1, 1):
        p.grad = torch.tensor(float(sign), dtype=torch.float64)
        before = float(p.detach())
        opt.step()
    assert float(p.detach()) == pytest.approx(before * (1 - 0.1 / (1 - 0.9 ** 3) * 0.5))  # masked step, decay alone


def test_state_dict_round_trip_continues_exactly():
    start, grads = random_problem(seed=3, steps=8)
    whole = fresh(start)
    run_sequence(TemporalAndMaskAdam(whole, lr=0.05, beta3=0.8, temporal_threshold=0.6, weight_decay=0.1), whole,
                 grads)
    first = fresh(start)
    opt = TemporalAndMaskAdam(first, lr=0.05, beta3=0.8, temporal_threshold=0.6, weight_decay=0.1)
    run_sequence(opt, first, grads[:3])
    saved = {"params": [p.detach().clone() for p in first], "optimizer": opt.state_dict()}
    assert all("sign_agreement" in s for s in saved["optimizer"]["state"].values())
    second = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    resumed = TemporalAndMaskAdam(second, lr=0.05, beta3=0.8, temporal_threshold=0.6, weight_decay=0.1)
    resumed.load_state_dict(saved["optimizer"])
    for a, b in zip(run_sequence(resumed, second, grads[3:]), whole):
        assert torch.equal(a, b)


def test_kept_fraction_counts_the_updated_coordinates():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = TemporalAndMaskAdam([p], lr=0.1, beta3=0.9, temporal_threshold=1.0)
    for g in ([1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0]):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    assert opt.pop_kept_fraction() == pytest.approx(6 / 8) and opt.pop_kept_fraction() is None


@pytest.mark.parametrize("kwargs, message", [({"beta3": 1.0, "temporal_threshold": 0.5}, "beta3"),
                                             ({"beta3": 0.9, "temporal_threshold": 1.5}, "temporal_threshold")])
def test_temporal_hyper_parameters_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TemporalAndMaskAdam([torch.nn.Parameter(torch.zeros(1))], lr=0.1, **kwargs)
