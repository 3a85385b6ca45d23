"""`hesd demo --lm` end to end (quick mode): Trainer run, `hesd analyze` on its folders, report."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from hesd.interfaces.cli import app


def test_demo_lm_quick(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--lm", "--quick", "--json", "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["command"].startswith("hesd analyze ") and "checkpoint-*" in out["command"]
    table = (tmp_path / "d" / "results" / "results.csv").read_text().splitlines()
    assert len(table) == 1 + 3  # checkpoints at steps 40, 80, 120
    assert out["selections"]["best_heldout"]["reason"].startswith("lowest heldout_loss")
    assert (tmp_path / "d" / "results" / "report.html").is_file()
