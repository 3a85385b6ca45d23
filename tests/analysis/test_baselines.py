"""The measures the model-zoo study needs (issue #18): negative mass, baselines, ExtremeOf, reliability."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import hesd
from hesd.analysis import evidence as evidence_module
from hesd.analysis.baselines import SIGMA, distance, random_sharpness
from hesd.analysis.selection import ExtremeOf, default_rules, select_all
from hesd.models import DigitsMLP, load_digits_tensors


def test_negative_mass_is_the_weight_on_negative_ritz_values():
    s = hesd.Spectrum.from_ritz([[-0.5, 0.1, 2.0], [-1.0, -0.2, 3.0]], [[0.25, 0.5, 0.25], [0.1, 0.3, 0.6]])
    assert hesd.criteria(s).neg_mass == pytest.approx((0.25 + 0.4) / 2, abs=1e-15)


def _model_and_data():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3)).double()
    data = [(torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))) for _ in range(3)]
    return model, data


def test_random_sharpness_against_perturbing_the_parameters_by_hand():
    model, data = _model_and_data()
    before = [p.detach().clone() for p in model.parameters()]

    def loss():
        with torch.no_grad():
            return sum(len(y) * float(torch.nn.functional.cross_entropy(model(x), y)) for x, y in data) / 120

    got = random_sharpness(model, torch.nn.functional.cross_entropy, data, draws=5, seed=7)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))  # untouched
    g = torch.Generator().manual_seed(7)
    base, rises = loss(), []
    for _ in range(5):
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), before, strict=True):
                p.copy_(p0 + SIGMA * p0.abs() * torch.randn(p.shape, generator=g).to(p))
        rises.append(loss() - base)
    assert got == pytest.approx(np.mean(rises), rel=1e-10, abs=1e-14)
    assert got > 0


def test_distance_and_dist_init_of_a_series(tmp_path):
    model, _ = _model_and_data()
    ref = {k: v + 0.5 for k, v in model.state_dict().items()}
    n = sum(p.numel() for p in model.parameters())
    assert distance(model, ref) == pytest.approx(0.5 * math.sqrt(n))
    assert math.isnan(distance(model, {"other.weight": torch.zeros(2)}))
    X, y, _, _ = load_digits_tensors()
    states = []
    for e in range(3):
        torch.manual_seed(e)
        states.append(DigitsMLP().state_dict())
        torch.save(states[-1], tmp_path / f"epoch_{e}.pt")
    res = hesd.analyze_checkpoints(
        DigitsMLP,
        tmp_path,
        (X[:200], y[:200]),
        settings=hesd.AnalysisSettings(num_steps=5, num_probes=1, refine_extremes=False),
    )
    want = [math.sqrt(sum(float(((s[k] - states[0][k]) ** 2).sum()) for k in s)) for s in states]
    assert np.allclose(res.table["dist_init"], want, rtol=1e-6)
    assert res.table["sharpness_random"].notna().all() and res.table["param_norm"].gt(0).all()


def test_extreme_of_picks_and_explains():
    t = pd.DataFrame(
        {
            "checkpoint": ["a", "b", "c"],
            "name": ["a", "b", "c"],
            "epoch": [0, 1, 2],
            "initial": [True, False, False],
            "status": ["ok"] * 3,
            "trace": [1.0, 5.0, 3.0],
            "hesd_type": ["MP", "MP", "undetermined"],
        }
    )
    assert ExtremeOf("trace", "max").select(t).checkpoint == "b"
    assert ExtremeOf("trace").select(t).checkpoint == "b"  # a is the initialisation, c undetermined
    assert ExtremeOf("trace", curvature=False).select(t).checkpoint == "c"
    with pytest.raises(hesd.HesdValueError, match="mode"):
        ExtremeOf("trace", "low")


def test_each_pick_carries_its_measured_reliability(monkeypatch):
    fake = {
        "scope": "a test zoo",
        "rules": {
            "smallest_lambda_max": {
                "mean_regret_points": 3.0,
                "ci": [1.0, 5.0],
                "median": 2.0,
                "zero_regret_share": 0.4,
                "runs": 10,
            }
        },
    }
    monkeypatch.setattr(evidence_module, "evidence", lambda: fake)
    t = pd.DataFrame(
        {
            "checkpoint": ["a", "b"],
            "epoch": [1, 2],
            "status": ["ok", "ok"],
            "ct": [-0.1, -0.2],
            "lambda_max": [2.0, 1.0],
            "hesd_type": ["MP", "MP"],
        }
    )
    sel = select_all(t, default_rules())
    assert sel["smallest_lambda_max"]["reliability"]["scope"] == "a test zoo"
    assert "reliability" not in sel["highest_ct_mp"]
    assert "3.0 held-out accuracy points" in evidence_module.reliability_text("smallest_lambda_max")
