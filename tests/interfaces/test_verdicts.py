"""No confident verdict from a spectrum that allows none; limits and a cost estimate before long work (issue #20)."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import hesd
from hesd.analysis.cost import estimate_cost
from hesd.analysis.criteria import MIN_STEPS, undetermined_reason
from hesd.analysis.decision import decide
from hesd.analysis.selection import default_rules, select_all
from hesd.checks import check_device
from hesd.errors import HesdValueError
from hesd.interfaces.cli import app
from hesd.models import DigitsMLP, load_digits_tensors


def _invoke(project, command, target, *extra):
    """``hesd COMMAND TARGET`` with the project's model and data factories."""
    p = project / "usermodels.py"
    args = [command, str(target), "--model", f"{p}:make_model", "--data", f"{p}:train_data", *map(str, extra)]
    return CliRunner().invoke(app, args)


def _saturated():
    """A classifier fitted to 100 % with its logits scaled: loss 0 in float32, a Hessian of about 1e-8."""
    X, y, _, _ = load_digits_tensors()
    X, y = X[:64], y[:64]
    torch.manual_seed(0)
    m = DigitsMLP()
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(X), y).backward()
        opt.step()
    assert (m(X).argmax(1) == y).all()
    return m, X, y


def test_a_numerically_zero_hessian_is_undetermined_not_mp():
    m, X, y = _saturated()
    s = hesd.AnalysisSettings(num_steps=20, num_probes=1)
    row, _ = hesd.analyze_model(m, (X, y), settings=s)
    assert row["hesd_type"] == "MP" and row["type_reason"] is None  # the fitted model still has curvature
    with torch.no_grad():
        for p in list(m.parameters())[-2:]:
            p.mul_(3)
    row, _ = hesd.analyze_model(m, (X, y), settings=s)
    assert row["hesd_type"] == "undetermined", row
    assert "numerically zero" in row["type_reason"] and row["lambda_max"] < 1e-6
    assert row["param_norm"] == pytest.approx(float(torch.cat([p.detach().flatten() for p in m.parameters()]).norm()))


def test_too_few_steps_are_undetermined_and_skipped_by_the_curvature_rules(tmp_path):
    X, y, Xh, yh = load_digits_tensors()
    for e in range(1, 3):
        torch.manual_seed(e)
        torch.save(DigitsMLP().state_dict(), tmp_path / f"epoch_{e}.pt")
    res = hesd.analyze_checkpoints(
        DigitsMLP,
        tmp_path,
        (X[:300], y[:300]),
        heldout=(Xh[:200], yh[:200]),
        settings=hesd.AnalysisSettings(num_steps=2, num_probes=1, refine_extremes=False),
    )
    assert (res.table["hesd_type"] == "undetermined").all()
    assert res.table["type_reason"].str.contains("2 Lanczos step").all()
    for rule in ("highest_ct_mp", "smallest_lambda_max"):
        assert res.selections[rule]["checkpoint"] is None
        assert "undetermined" in res.selections[rule]["reason"]
    assert res.selections["best_heldout"]["checkpoint"] is not None  # held-out data needs no spectrum
    d = decide(res.table, res.selections)
    assert d.keep is None and d.sentence.startswith("Nothing to choose") and "undetermined" in d.sentence


def test_undetermined_reason_cases():
    assert undetermined_reason(-0.2, 4.8, 16.6, 80, 3466, 1e-4) == ""
    assert undetermined_reason(0.0, 0.0, 10.0, 80, 3466, 1e-4).startswith("the Hessian is numerically zero")
    assert "Lanczos step" in undetermined_reason(-0.2, 4.8, 16.6, MIN_STEPS - 1, 3466, 1e-4)
    assert undetermined_reason(-0.2, 4.8, 16.6, 2, 2, 1e-4) == ""  # two steps span a 2-dimensional space: exact
    assert undetermined_reason(-1e-3, 1e-3, 1.0, 80, 100, 0.0) == ""  # zero_curvature=0 turns the check off


def test_a_lone_initial_checkpoint_is_said_to_be_skipped_on_purpose():
    t = pd.DataFrame(
        {
            "checkpoint": ["r/epoch_0.pt"],
            "name": ["epoch_0.pt"],
            "epoch": [0],
            "initial": [True],
            "status": ["ok"],
            "ct": [-0.1],
            "lambda_max": [2.0],
            "hesd_type": ["MP"],
            "qs_flag": [False],
        }
    )
    sel = select_all(t, default_rules())
    assert sel["highest_ct_mp"]["checkpoint"] is None
    assert "only the initialisation (epoch_0.pt)" in sel["highest_ct_mp"]["reason"]
    assert sel["highest_ct_mp"]["reason"].count("initialisation") == 1
    d = decide(t, sel)
    assert "skip it on purpose" in d.sentence and d.warnings == []  # nothing failed: no "see the errors"


def test_settings_refuse_unbounded_probes_and_steps_and_the_cli_exits_2_at_once(project):
    with pytest.raises(HesdValueError, match="num_probes=1,000,000,000 is beyond"):
        hesd.AnalysisSettings(num_probes=10**9)
    with pytest.raises(HesdValueError, match="num_steps"):
        hesd.AnalysisSettings(num_steps=10**6)
    res = _invoke(project, "analyze", project / "ckpts", "--probes", "1000000000", "--out", project / "never")
    assert res.exit_code == 2 and "beyond hesd's limit" in res.output
    assert not (project / "never").exists()


def test_the_cost_is_estimated_before_the_work_and_a_long_one_is_said(tmp_path, caplog, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    data = [(torch.randn(32, 8), torch.randint(0, 3, (32,))) for _ in range(4)]
    s = hesd.AnalysisSettings(num_steps=50, num_probes=7)
    est = estimate_cost(model, torch.nn.functional.cross_entropy, data, s, checkpoints=3)
    assert est.products_per_checkpoint == 7 * 50 + 40 + 2 and est.checkpoints == 3
    assert est.basis_bytes == 50 * 195 * 4 and est.seconds_per_product > 0
    held = hesd.AnalysisSettings(num_steps=50, num_probes=7, heldout_criteria=True, refine_extremes=False)
    assert estimate_cost(model, torch.nn.functional.cross_entropy, data, held).products_per_checkpoint == 702
    for e in range(2):
        torch.save(model.state_dict(), tmp_path / f"epoch_{e + 1}.pt")
    monkeypatch.setattr("hesd.analysis.cost.LONG", 0.0)  # every run is "long": the warning must come first
    with caplog.at_level(logging.INFO, logger="hesd"):
        hesd.analyze_checkpoints(
            lambda: model, tmp_path, data, settings=hesd.AnalysisSettings(num_steps=6, num_probes=1)
        )
    said = [r for r in caplog.records if "Hessian-vector products per checkpoint" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING and "× 2 checkpoint(s)" in said[0].getMessage()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_before_any_work(project):
    with pytest.raises(HesdValueError, match="no usable CUDA device"):
        check_device("cuda", "device", "analyze_checkpoints")
    with pytest.raises(HesdValueError, match="is not a device"):
        check_device("gpu", "device", "analyze_checkpoints")
    for dev in ("cuda", "cuda:3", "gpu"):
        res = _invoke(project, "analyze", project / "ckpts", "--device", dev, "--out", project / "nodev")
        assert res.exit_code == 2 and "--device" in res.output and "Traceback" not in res.output, res.output
    res = _invoke(project, "spectrum", project / "ckpts" / "epoch_001.pt", "--device", "cuda")
    assert res.exit_code == 2 and "no usable CUDA" in res.output
