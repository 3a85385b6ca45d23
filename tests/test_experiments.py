"""Every reproduction experiment runs in --quick mode (so the scripts cannot rot)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

EXP = Path(__file__).resolve().parents[1] / "experiments"


def test_run_all_quick(tmp_path):
    p = subprocess.run([sys.executable, str(EXP / "run_all.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    tables = tmp_path / "tables"
    for name in ("claim1", "claim2_clipping", "claim2_adahessian", "claim3_selection", "claim4_qs",
                 "threshold_sensitivity"):  # fmt: skip
        t = pd.read_csv(tables / f"{name}.csv")
        assert len(t) > 0, name
    c1 = pd.read_csv(tables / "claim1.csv")
    assert (c1["MP"] + c1["MN"] == c1["checkpoints"]).all()
    # hesd's own store and report code wrote the per-run results
    assert any((tmp_path / "results").glob("*/results.csv"))


def test_zoo_quick(tmp_path):
    """The model-zoo study (docs/evidence.md) end to end in --quick mode: every network trained and
    measured, τ / Ψ / regret tables and evidence.json written; a second run resumes (nothing retrained)."""
    import json

    cmd = [sys.executable, str(EXP / "zoo" / "run.py"), "--quick", "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    ck = pd.read_csv(tmp_path / "checkpoints.csv")
    assert ck["cfg_name"].nunique() == 44 and (ck["status"] == "ok").all()
    for col in ("lambda_max", "ct", "heldout_ct", "diff_kh05", "neg_mass", "dist_init", "sharpness_random"):
        assert ck[col].notna().all(), col
    tau = pd.read_csv(tmp_path / "tables" / "tau.csv")
    assert set(tau["measure"]) >= {"lambda_max", "trace", "ct", "param_norm", "sharpness_random"}
    assert tau["tau_gap"].between(-1, 1).all() and (tau["tau_gap_lo"] <= tau["tau_gap_hi"]).all()
    psi = pd.read_csv(tmp_path / "tables" / "psi.csv")
    assert {f"axis_{a}" for a in ("lr", "width", "optimizer", "label_noise")} <= set(psi.columns)
    evidence = json.loads((tmp_path / "evidence.json").read_text())
    assert {"highest_ct_mp", "smallest_lambda_max", "last_checkpoint"} <= set(evidence["rules"])
    assert (tmp_path / "figures" / "zoo_tau.png").stat().st_size > 5000
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*.pt")}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)  # resumes: nothing retrained
    assert p.returncode == 0, p.stderr[-3000:]
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*.pt")}
