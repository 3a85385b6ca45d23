"""One folder, one run; nothing mixed; bad input stopped before any work (issue #20)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

import hesd
from helpers import make_series
from hesd.analysis.store import ResultFolderLockedError, ResultStore, SettingsMismatchError
from hesd.interfaces.cli import app
from hesd.models import DigitsMLP

FAST = hesd.AnalysisSettings(num_steps=5, num_probes=1, refine_extremes=False)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return make_series(tmp_path_factory.mktemp("ckpts"), 2)


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from hesd.analysis.store import ResultStore; "
        f"s = ResultStore({str(tmp_path / 'out')!r}, {{'a': 1}}); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ResultFolderLockedError, match=rf"pid {holder.pid}"):
            ResultStore(tmp_path / "out", {"a": 1})
        ResultStore.open_existing(tmp_path / "out")  # rebuilding a report takes no lock
    finally:
        holder.kill()
        holder.wait()
    ResultStore(tmp_path / "out", {"a": 1}).close()  # the lock died with its process


def test_only_a_dead_writers_temporaries_are_removed(tmp_path):
    store = ResultStore(tmp_path, {"a": 1})
    store.close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "figures").mkdir()
        stale = [tmp_path / f".results.csv.{dead_pid}.x1.tmp", tmp_path / "figures" / f".a.png.{dead_pid}.x2.tmp",
                 tmp_path / "rows" / f".k.json.{dead_pid}.x3.tmp", tmp_path / ".old-format.tmp"]  # fmt: skip
        alive = tmp_path / f".report.html.{live.pid}.x4.tmp"
        for p in [*stale, alive]:
            p.write_text("partial")
        ResultStore(tmp_path, {"a": 1}).close()
        assert not any(p.exists() for p in stale) and alive.exists()
    finally:
        live.kill()
        live.wait()


def test_resuming_with_other_data_loss_or_params_is_refused_naming_what_changed(series, tmp_path):
    d, train, held = series
    out = tmp_path / "r"
    X, y = train
    two = [(X[:100], y[:100]), (X[100:], y[100:])]
    hesd.analyze_checkpoints(DigitsMLP, d, two, heldout=held, out_dir=out, settings=FAST)
    with pytest.raises(SettingsMismatchError, match=r"inputs\.data"):
        hesd.analyze_checkpoints(DigitsMLP, d, held, heldout=held, out_dir=out, settings=FAST)
    with pytest.raises(SettingsMismatchError, match=r"inputs\.heldout"):
        hesd.analyze_checkpoints(DigitsMLP, d, two, heldout=train, out_dir=out, settings=FAST)
    with pytest.raises(SettingsMismatchError, match=r"inputs\.loss.*multi_margin_loss"):
        hesd.analyze_checkpoints(DigitsMLP, d, two, heldout=held, out_dir=out, settings=FAST,
                                 loss_fn=torch.nn.functional.multi_margin_loss)  # fmt: skip
    narrow = hesd.AnalysisSettings(num_steps=5, num_probes=1, refine_extremes=False, params=["net.1.*"])
    with pytest.raises(SettingsMismatchError, match=r"analysis\.params"):
        hesd.analyze_checkpoints(DigitsMLP, d, two, heldout=held, out_dir=out, settings=narrow)
    # the same batches in another order resume (every row from the store); overwrite discards
    again = hesd.analyze_checkpoints(DigitsMLP, d, two[::-1], heldout=held, out_dir=out, settings=FAST)
    assert len(again.table) == 2 and again.table["hvps"].notna().all()
    hesd.analyze_checkpoints(DigitsMLP, d, held, heldout=held, out_dir=out, settings=FAST, overwrite=True)


def test_bad_data_stops_up_front_with_exit_2_and_nothing_written(series, tmp_path):
    d, _, _ = series
    mod = tmp_path / "m.py"
    mod.write_text(
        "import torch\n"
        "def dicts():\n    return [{'x': torch.randn(4, 64), 'labels': torch.zeros(4, dtype=torch.long)}]\n"
        "def out_of_range():\n    return [(torch.randn(4, 64), torch.full((4,), 10))]\n"
    )
    for fn, words in (("dicts", "got a dict"), ("out_of_range", "out of bounds")):
        out = tmp_path / fn
        t = time.perf_counter()
        res = CliRunner().invoke(app, ["analyze", str(d), "--model", "hesd.models:DigitsMLP", "--data",
                                       f"{mod}:{fn}", "--out", str(out), "--steps", "5", "--probes", "1"])  # fmt: skip
        assert res.exit_code == 2, res.output
        assert words in res.output and "first batch" in res.output
        assert not (out / "rows").exists() or not any((out / "rows").iterdir())
        assert time.perf_counter() - t < 60


def test_the_lock_file_names_the_holder(tmp_path):
    s = ResultStore(tmp_path, {"a": 1})
    assert (tmp_path / ".hesd.lock").read_text() == str(os.getpid())
    s.close()
