"""Proposition 2 / Fig. 4: closed forms, the proposition's bound and the Monte Carlo estimate."""
import math

import pytest
import torch

from and_mask.and_mask_utils import agreement_mask
from and_mask.paper import masked_noise as mn

SMALL = [(d, t) for d in range(2, 120) for t in range(d // 2 + 1, d + 1)]


def test_threshold_is_the_exact_ceiling_and_its_tau_matches_the_code_mask():
    assert [mn.agreeing_signs(d, 0.8) for d in (5, 10, 15, 35, 3)] == [4, 8, 12, 28, 3]
    generator = torch.Generator().manual_seed(0)
    for d in range(2, 41):
        grads = torch.randn(d, 4000, generator=generator, dtype=torch.float64)
        positives = (grads > 0).sum(dim=0)
        for t in range(d // 2 + 1, d + 1):
            expected = (torch.maximum(positives, d - positives) >= t).double()
            assert torch.equal(agreement_mask(grads, mn.tau_of(d, t)), expected), (d, t)


def test_closed_forms_against_enumeration_of_small_cases():
    """p_t and E[ḡ_j² m_j] by summing over every sign pattern count k with its probability."""
    for d, t in [(2, 2), (5, 4), (7, 5), (10, 8)]:
        pk = [math.comb(d, k) / 2 ** d for k in range(d + 1)]
        kept = [k for k in range(d + 1) if max(k, d - k) >= t]
        assert mn.keep_probability(d, t) == pytest.approx(sum(pk[k] for k in kept))
        second_moment = sum(pk[k] * (d * (1 - 2 / math.pi) + (2 * k - d) ** 2 * 2 / math.pi) for k in kept) / d ** 2
        assert mn.masked_sq_norm(1, d, t) == pytest.approx(second_moment)
    # without a mask (every pattern kept) the formula gives back E‖ḡ‖² = n σ²/d
    assert mn.masked_sq_norm(3000, 3, 2, sigma=2.0) == pytest.approx(mn.mean_sq_norm(3000, 3, sigma=2.0))


def test_the_proposition_bound_holds_and_decays_exponentially():
    assert all(mn.masked_sq_norm(1, d, t) <= mn.proof_bound(1, d, t) * (1 + 1e-12) for d, t in SMALL)
    ratios = [mn.proof_bound(1, d, math.ceil(0.8 * d)) / mn.mean_sq_norm(1, d) for d in (20, 40, 80, 160)]
    assert all(later < earlier / 10 for earlier, later in zip(ratios, ratios[1:]))  # faster than any power of d


def test_the_printed_last_step_fails_only_when_every_sign_must_agree():
    failures = [(d, t) for d, t in SMALL if mn.printed_bound(1, d, t) < mn.masked_sq_norm(1, d, t)]
    assert failures == [(d, d) for d in range(2, 120)]


@pytest.mark.parametrize("d", [4, 10, 25])
def test_monte_carlo_estimate_matches_the_closed_forms(d):
    t = mn.agreeing_signs(d, 0.8)
    draws = mn.sample(3000, d, t, 1.5, 200, torch.Generator().manual_seed(d))
    for key, exact in [("average", mn.mean_sq_norm(3000, d, 1.5)), ("masked", mn.masked_sq_norm(3000, d, t, 1.5)),
                       ("kept", mn.keep_probability(d, t))]:
        values = draws[key]
        assert abs(values.mean() - exact) < 5 * values.std(ddof=1) / math.sqrt(len(values)), key


def test_command_writes_a_figure_and_a_table(tmp_path, capsys):
    rows = mn.main(["--envs", "2,10,40", "--repeats", "3", "--n_params", "200", "--out", str(tmp_path)])
    assert [r["d"] for r in rows] == [2, 10, 40]
    assert (tmp_path / "masked_noise.png").stat().st_size > 0
    text = (tmp_path / "masked_noise.md").read_text()
    assert text.count("\n| ") == 4 and "| 10 | 8 | 0.600 |" in text
    assert "masked_noise.md" in capsys.readouterr().out


@pytest.mark.parametrize("bad, message", [(["--envs", "1,4"], "at least 2"),
                                          (["--agreement_fraction", "0.5"], "(0.5, 1]")])
def test_bad_flags_are_one_line_errors(tmp_path, bad, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mn.main(bad + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
