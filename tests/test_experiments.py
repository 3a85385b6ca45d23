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
