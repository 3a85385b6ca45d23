"""Criteria against hand-computed values, edge cases, and exact spectra of tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hesd
from helpers import make_case
from hesd.analysis import compare_criteria, per_probe_criteria, zero_mass

CE = torch.nn.functional.cross_entropy


def test_hand_computed_single_probe():
    lam = [-2.0, -0.5, 1.0, 4.0]
    w = [0.1, 0.2, 0.3, 0.4]
    c = hesd.criteria(hesd.Spectrum.from_ritz([lam], [w]))
    assert c.re == pytest.approx(0.5)
    num = math.sqrt(0.2) + math.sqrt(0.1)
    den = math.sqrt(0.3) + math.sqrt(1.6)
    assert c.kh05 == pytest.approx(num / den) and c.khn == pytest.approx(num / den)
    assert c.ct == pytest.approx(-0.5) and c.hesd_type == "MP"
    c1 = hesd.criteria(hesd.Spectrum.from_ritz([lam], [w]), n=1.0)
    assert c1.khn == pytest.approx((0.2 + 0.1) / (0.3 + 1.6))
    assert c1.kh05 == pytest.approx(num / den)  # KH05 is always reported


def test_average_over_probes_with_spreads_and_pooled():
    s = hesd.Spectrum.from_ritz([[-1.0, 2.0], [-3.0, 4.0, 5.0]], [[0.5, 0.5], [0.2, 0.3, 0.5]])
    c = hesd.criteria(s)
    ct = np.array([-0.5, -0.6])
    assert c.ct == pytest.approx(ct.mean())
    assert c.ct_std == pytest.approx(ct.std(ddof=1)) and c.ct_se == pytest.approx(ct.std(ddof=1) / math.sqrt(2))
    assert c.re == pytest.approx(0.55)
    assert c.ct_pooled == pytest.approx(-3.0 / 5.0)
    assert c.hesd_type == "MP"  # mean -0.55 > -0.6
    assert hesd.criteria(s, aggregate="pooled").hesd_type == "MN"  # pooled -0.6 is not > -0.6
    assert c.per_probe["ct"] == pytest.approx([-0.5, -0.6])


def test_threshold_is_strict_and_configurable():
    s = hesd.Spectrum.from_ritz([[-0.6, 1.0]], [[0.5, 0.5]])
    assert hesd.criteria(s).hesd_type == "MN"  # Ct = -0.6 is not > -0.6
    assert hesd.criteria(s, ct_threshold=-0.7).hesd_type == "MP"


def test_edge_no_negative_values():
    c = hesd.criteria(hesd.Spectrum.from_ritz([[0.5, 1.0, 3.0]], [[0.2, 0.3, 0.5]]))
    assert c.ct == 0.0 and c.khn == 0.0 and c.hesd_type == "MP"
    assert c.re == pytest.approx(0.5 / 3.0)


def test_edge_no_positive_values():
    c = hesd.criteria(hesd.Spectrum.from_ritz([[-3.0, -1.0]], [[0.5, 0.5]]))
    assert c.ct == -math.inf and c.khn == math.inf and c.re == 3.0 and c.hesd_type == "MN"
    assert c.stable_step == math.inf


def test_edge_zero_values_only_and_mixed_zero():
    c = hesd.criteria(hesd.Spectrum.from_ritz([[0.0, 0.0]], [[0.5, 0.5]]))
    assert c.ct == 0.0 and c.re == 0.0 and c.khn == 0.0 and c.hesd_type == "MP"
    assert per_probe_criteria(np.array([-1.0, 0.0]), np.array([0.5, 0.5])) == (math.inf, math.inf, -math.inf)


def test_broken_down_probe_used_as_is():
    A = torch.diag(torch.tensor([-1.0, -1.0, 2.0, 2.0, 2.0, 4.0], dtype=torch.float64))
    s = hesd.slq(A, num_steps=6, num_probes=2)
    assert all(s.broke_down)
    c = hesd.criteria(s)
    assert c.ct == pytest.approx(-0.25) and c.re == pytest.approx(0.25)


def test_stability_and_zero_mass():
    s = hesd.Spectrum.from_ritz([[-0.001, 0.0005, 0.002, 10.0]], [[0.25, 0.25, 0.25, 0.25]])
    c = hesd.criteria(s, lr=0.5, zero_band=0.0001)
    assert c.stable_step == pytest.approx(0.2) and c.eos_ratio == pytest.approx(2.5)
    assert c.zero_mass == pytest.approx(0.5)  # |λ| <= 0.001: two of four
    assert zero_mass(s, 0.01) == pytest.approx(0.75)


def test_compare_train_heldout():
    a = hesd.criteria(hesd.Spectrum.from_ritz([[-1.0, 2.0]], [[0.5, 0.5]]))
    b = hesd.criteria(hesd.Spectrum.from_ritz([[-1.5, 2.0]], [[0.5, 0.5]]))
    d = compare_criteria(a, b)
    assert d["diff_ct"] == pytest.approx(-0.25) and d["train_hesd_type"] == "MP" and d["heldout_hesd_type"] == "MN"


def test_criteria_argument_errors():
    s = hesd.Spectrum.from_ritz([[1.0]], [[1.0]])
    with pytest.raises(ValueError, match="criteria: n must be positive"):
        hesd.criteria(s, n=-0.5)
    with pytest.raises(ValueError, match="aggregate"):
        hesd.criteria(s, aggregate="median")
    with pytest.raises(TypeError, match="hesd.Spectrum"):
        hesd.criteria([1.0, 2.0])


@pytest.mark.parametrize("name", ["mlp", "cnn", "attention"])
def test_ct_on_converged_slq_equals_exact_eigenvalue_ratio(name):
    model, batches, _ = make_case(name, seed=21)
    H = hesd.exact_hessian(model, CE, batches)
    ev = torch.linalg.eigvalsh(H).numpy()
    op = hesd.HessianOperator(model, CE, batches)
    s = hesd.slq(op, num_steps=op.shape[0], num_probes=2)
    c = hesd.criteria(s)
    neg, pos = ev[ev < -1e-12], ev[ev > 1e-12]
    expected = neg.min() / pos.max() if len(neg) else 0.0
    assert c.ct == pytest.approx(expected, abs=1e-8)
    assert c.re == pytest.approx(abs(ev.min() / ev.max()), abs=1e-8)
    assert c.lambda_max == pytest.approx(ev.max(), abs=1e-8)


def test_kh05_depends_on_step_count_while_ct_converges():
    """Documented behaviour: KH05 on raw Ritz values keeps changing with the number of steps."""
    from helpers import random_symmetric

    g = torch.Generator().manual_seed(3)
    top = torch.tensor([-0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0], dtype=torch.float64)
    eigs = torch.cat([0.01 * torch.randn(1990, generator=g, dtype=torch.float64), top])
    A = random_symmetric(2000, eigs, seed=4)
    c20 = hesd.criteria(hesd.slq(A, num_steps=20, num_probes=2, seed=0))
    c200 = hesd.criteria(hesd.slq(A, num_steps=200, num_probes=2, seed=0))
    assert c20.ct == pytest.approx(c200.ct, abs=1e-6) and c200.ct == pytest.approx(-0.05, abs=1e-9)
    assert c200.kh05 > 1.5 * c20.kh05
