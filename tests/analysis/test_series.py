"""A real checkpoint series on the digits: table, failures, selection, kill and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import hesd
from hesd.analysis import BestHeldout, HighestCtAmongMP, QSRule, SettingsMismatchError, SmallestLambdaMax
from hesd.models import DigitsMLP, load_digits_tensors
from hesd.training import TrainConfig, train_with_checkpoints

JOB = Path(__file__).with_name("series_job.py")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    root = tmp_path_factory.mktemp("series")
    X, y, _, _ = load_digits_tensors()
    torch.manual_seed(0)
    train_with_checkpoints(DigitsMLP(), X, y, root, TrainConfig(epochs=4, lr=0.05, batch_size=64))
    good = torch.load(root / "epoch_004.pt", weights_only=True)
    data = (root / "epoch_004.pt").read_bytes()
    (root / "epoch_005.pt").write_bytes(data[: len(data) // 3])  # truncated
    torch.save({"net.1.weight": torch.zeros(3, 3)}, root / "epoch_006.pt")  # another architecture
    torch.save({**good, "x": _Evil(str(root / "pwned"))}, root / "epoch_007.pt")  # malicious
    return root


def _run_job(ckpt_dir, out_dir, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, str(JOB), str(ckpt_dir), str(out_dir)], env=env, **kw)


def _table(out_dir) -> pd.DataFrame:
    return pd.read_csv(Path(out_dir) / "results.csv").drop(columns=["seconds"])


def test_series_table_failures_and_selection(series, tmp_path):
    X, y, Xh, yh = load_digits_tensors()
    settings = hesd.AnalysisSettings(num_steps=40, num_probes=2, lr=0.05)
    res = hesd.analyze_checkpoints(DigitsMLP, series, (X, y), heldout=(Xh, yh), out_dir=tmp_path, settings=settings)
    t = res.table
    assert list(t["epoch"]) == list(range(8))
    assert list(t["status"]) == ["ok"] * 5 + ["failed"] * 3
    assert not (series / "pwned").exists()
    errors = dict(res.failed)
    assert "corrupt or truncated" in errors[str(series / "epoch_005.pt")]
    assert "does not match the model" in errors[str(series / "epoch_006.pt")]
    assert "refused to load" in errors[str(series / "epoch_007.pt")]
    ok = t[t["status"] == "ok"]
    for col in ("lambda_min", "lambda_max", "trace", "re", "kh05", "ct", "heldout_accuracy", "sha256"):
        assert ok[col].notna().all(), col
    assert (ok["lambda_min"] <= ok["lambda_max"]).all()
    assert set(ok["hesd_type"]) <= {"MP", "MN"}
    assert ((ok["ct"] > -0.6) == (ok["hesd_type"] == "MP")).all()
    assert ok["heldout_accuracy"].iloc[-1] > 0.8  # training worked
    assert ok["sha256"].nunique() == 5
    # Files on disk: one row per checkpoint, the CSV, the selection.
    assert len(list((tmp_path / "rows").glob("*.json"))) == 8
    csv = pd.read_csv(tmp_path / "results.csv")
    assert len(csv) == 8 and {"checkpoint", "epoch", "lambda_min", "lambda_max", "trace", "re", "kh05", "ct",
                              "hesd_type"} <= set(csv.columns)  # fmt: skip
    sel = res.selections
    assert sel["highest_ct_mp"]["checkpoint"] == ok.loc[ok[ok["epoch"] > 0]["ct"].idxmax(), "checkpoint"]
    assert sel["smallest_lambda_max"]["epoch"] == int(ok.loc[ok[ok["epoch"] > 0]["lambda_max"].idxmin(), "epoch"])
    assert sel["best_heldout"]["gap_to_best"] == 0
    assert "gap_to_best" in sel["highest_ct_mp"]
    # Same probes at every checkpoint: the seed is in the settings and the spectra are comparable.
    assert all(s.num_probes == 2 for s in res.spectra.values())


def test_settings_mismatch_is_refused(series, tmp_path):
    X, y, _, _ = load_digits_tensors()
    s1 = hesd.AnalysisSettings(num_steps=10, num_probes=1, refine_extremes=False)
    ckpts = [series / "epoch_000.pt"]
    hesd.analyze_checkpoints(DigitsMLP, ckpts, (X, y), out_dir=tmp_path, settings=s1)
    s2 = hesd.AnalysisSettings(num_steps=11, num_probes=1, refine_extremes=False)
    with pytest.raises(SettingsMismatchError, match="num_steps"):
        hesd.analyze_checkpoints(DigitsMLP, ckpts, (X, y), out_dir=tmp_path, settings=s2)
    res = hesd.analyze_checkpoints(DigitsMLP, ckpts, (X, y), out_dir=tmp_path, settings=s2, overwrite=True)
    assert res.table["status"].tolist() == ["ok"]


def test_a_folder_written_with_other_probes_is_not_resumed(series, tmp_path, monkeypatch):
    """The probe stream is part of a folder's fingerprint: spectra from probes drawn another way
    (an earlier hesd's) are not mixed with new ones."""
    import hesd.analysis.series as series_module

    X, y, _, _ = load_digits_tensors()
    s = hesd.AnalysisSettings(num_steps=10, num_probes=1, refine_extremes=False)
    ckpts = [series / "epoch_000.pt"]
    monkeypatch.setattr(series_module, "PROBE_STREAM", "rademacher: one random int8 per entry")
    hesd.analyze_checkpoints(DigitsMLP, ckpts, (X, y), out_dir=tmp_path, settings=s)
    monkeypatch.undo()
    with pytest.raises(SettingsMismatchError, match="probes: 'rademacher: one random int8 per entry' → 'rademacher"):
        hesd.analyze_checkpoints(DigitsMLP, ckpts, (X, y), out_dir=tmp_path, settings=s)


def test_kill_and_resume_equals_uninterrupted(series, tmp_path):
    ref_dir, out_dir = tmp_path / "ref", tmp_path / "resumed"
    assert _run_job(series, ref_dir).wait(timeout=300) == 0
    proc = _run_job(series, out_dir)
    rows = out_dir / "rows"
    deadline = time.time() + 240
    while time.time() < deadline and not (rows.exists() and any(rows.glob("*.json"))):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_at_kill = len(list(rows.glob("*.json")))
    assert 1 <= done_at_kill < 8, "the kill must land midway"
    for f in rows.glob("*.json"):  # every row on disk is complete JSON
        pd.read_json(f, typ="series")
    assert _run_job(series, out_dir).wait(timeout=300) == 0
    assert not list(rows.glob(".*.tmp"))  # a killed write's temp file is cleaned on reopen
    a, b = _table(ref_dir), _table(out_dir)
    assert len(b) == 8 and b["checkpoint"].is_unique
    pd.testing.assert_frame_equal(a, b)


def test_resume_does_not_recompute_finished_checkpoints(series, tmp_path):
    X, y, _, _ = load_digits_tensors()
    s = hesd.AnalysisSettings(num_steps=10, num_probes=1, refine_extremes=False)
    ckpts = [series / "epoch_000.pt", series / "epoch_001.pt"]
    hesd.analyze_checkpoints(DigitsMLP, ckpts[:1], (X, y), out_dir=tmp_path, settings=s)
    events = []
    hesd.analyze_checkpoints(DigitsMLP, ckpts, (X, y), out_dir=tmp_path, settings=s,
                             progress=lambda e, p: events.append(e))  # fmt: skip
    assert events.count("cached") == 1 and events.count("checkpoint") == 1


def test_qs_rule_on_collapsing_series():
    rule = QSRule(lambda_frac=0.5, width_frac=0.5, mass_level=0.9, band_frac=0.05)
    spectra = [
        hesd.Spectrum.from_ritz([[-0.5, 0.0, 5.0, 10.0]], [[0.1, 0.5, 0.2, 0.2]]),
        hesd.Spectrum.from_ritz([[-0.3, 0.0, 3.0, 8.0]], [[0.1, 0.6, 0.2, 0.1]]),
        hesd.Spectrum.from_ritz([[-0.01, 0.0, 0.2, 2.0]], [[0.1, 0.8, 0.05, 0.05]]),
    ]
    lmax = [s.lambda_max for s in spectra]
    width = [s.lambda_max - s.lambda_min for s in spectra]
    out = rule.apply(lmax, width, spectra)
    assert [o["qs_flag"] for o in out] == [False, False, True]
    assert out[2]["qs_zero_mass"] == pytest.approx(0.95)
    assert out[1]["qs_lambda_ratio"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="QSRule: mass_level must be in"):
        QSRule(mass_level=1.5)


def test_selection_rules_on_a_table():
    t = pd.DataFrame(
        {"checkpoint": ["a", "b", "c", "d"], "epoch": [0, 1, 2, 3], "status": ["ok"] * 4,
         "ct": [-0.1, -0.3, -0.2, -0.9], "lambda_max": [9.0, 5.0, 4.0, 1.0],
         "heldout_accuracy": [0.1, 0.8, 0.9, 0.85]}
    )  # fmt: skip
    assert tuple(HighestCtAmongMP().select(t)) == (
        "c",
        "highest Ct = -0.2000 among 2 MP checkpoint(s) (Ct > -0.6) of 3",
    )
    assert HighestCtAmongMP(skip_initial=False).select(t).checkpoint == "a"
    assert SmallestLambdaMax().select(t).checkpoint == "d"
    assert BestHeldout().select(t).epoch == 2
    mn = t.assign(ct=[-1.0, -0.9, -0.8, -0.7])
    sel = HighestCtAmongMP().select(mn)
    assert sel.checkpoint is None and "no checkpoint is mainly positive" in sel.reason
    with pytest.raises(ValueError, match="ct_threshold"):
        HighestCtAmongMP(ct_threshold=0.5)
    with pytest.raises(ValueError, match="mode"):
        BestHeldout(mode="best")


def test_one_shot_data_serves_every_checkpoint(tmp_path):
    """A generator of batches is read once for the whole series: before 0.2.0 the first checkpoint used
    it up and every later one failed with "data yielded no samples"."""
    X, y, Xh, yh = load_digits_tensors(dtype=torch.float64)
    for e in range(3):
        torch.manual_seed(e)
        torch.save(DigitsMLP().double().state_dict(), tmp_path / f"epoch_{e}.pt")
    settings = hesd.AnalysisSettings(num_steps=8, num_probes=1, refine_extremes=False, dtype="float64")
    batches = ((X[i : i + 400], y[i : i + 400]) for i in range(0, len(y), 400))
    heldout = iter([(Xh, yh)])
    res = hesd.analyze_checkpoints(DigitsMLP, tmp_path, batches, heldout=heldout, settings=settings)
    assert res.table["status"].tolist() == ["ok"] * 3 and not res.failed
    assert res.table["heldout_accuracy"].notna().all()
    full = hesd.analyze_checkpoints(DigitsMLP, tmp_path, [(X, y)], settings=settings)
    assert res.table["train_loss"].tolist() == pytest.approx(full.table["train_loss"].tolist(), rel=1e-12)
