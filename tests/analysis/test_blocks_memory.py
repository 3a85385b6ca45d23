"""Block analysis and the memory-budgeted analysis."""

from __future__ import annotations

import pytest
import torch

import hesd
from helpers import make_case
from hesd.analysis import analyze_blocks
from hesd.analysis.memory_plan import MARGIN, plan_memory

CE = torch.nn.functional.cross_entropy


def test_blocks_are_principal_submatrices():
    model, batches, _ = make_case("mlp", seed=41)
    H = hesd.exact_hessian(model, CE, batches)
    n0 = model.net[0].weight.numel() + model.net[0].bias.numel()
    settings = hesd.AnalysisSettings(num_steps=200, num_probes=1, refine_extremes=True, extreme_tol=1e-10)
    t = analyze_blocks(model, batches, settings=settings)
    assert t["block"].tolist() == ["net"]
    t = analyze_blocks(model, batches, blocks={"first": ["net.0.*"], "last": ["net.2.*"]}, settings=settings)
    for name, block in (("first", H[:n0, :n0]), ("last", H[n0:, n0:])):
        ev = torch.linalg.eigvalsh(block)
        row = t[t["block"] == name].iloc[0]
        assert row["lambda_max"] == pytest.approx(float(ev[-1]), abs=1e-8)
        assert row["lambda_min"] == pytest.approx(float(ev[0]), abs=1e-8)
    with pytest.raises(ValueError, match="match no trainable parameter"):
        hesd.analyze_model(model, batches, settings=hesd.AnalysisSettings(params=["nope.*"]))


def test_max_memory_uses_a_bounded_basis_and_keeps_the_extremes():
    model, batches, _ = make_case("cnn", seed=42)
    full, _ = hesd.analyze_model(model, batches, settings=hesd.AnalysisSettings(num_steps=60, num_probes=2))
    P = full["num_params"]
    roomy = plan_memory(model, CE, batches, num_steps=60, max_memory=2**30)
    assert roomy.footprint is not None and roomy.footprint.recompute_product is not None
    lean = roomy.parts["gradient"] + roomy.parts["Lanczos vectors"] + roomy.footprint.recompute_product
    tight = hesd.AnalysisSettings(num_steps=60, num_probes=2, max_memory=int((lean + 8 * P * 6) / (1 - MARGIN)))
    row, _ = hesd.analyze_model(model, batches, settings=tight)
    plan = plan_memory(model, CE, batches, num_steps=60, max_memory=tight.max_memory)
    assert plan.basis["basis_bytes"] < 60 * 8 * P  # a reduced basis (bfloat16 here; batches cut to make room)
    assert row["lambda_max"] == pytest.approx(full["lambda_max"], rel=1e-6)  # certified extremes unaffected
    assert row["lambda_min"] == pytest.approx(full["lambda_min"], rel=1e-6)
    assert row["slq_lambda_max"] == pytest.approx(full["slq_lambda_max"], rel=1e-3)
    assert row["ct"] == pytest.approx(full["ct"], abs=0.02)
    with pytest.raises(ValueError, match="max_memory must be a positive"):
        hesd.AnalysisSettings(max_memory=0)
