"""The hesd command line: analyze, spectrum, report, demo, errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from hesd.interfaces.cli import app

runner = CliRunner()
FAST = ["--steps", "12", "--probes", "2"]


def _analyze(project, out, *extra, checkpoints=None):
    ckpts = checkpoints or [str(project / "ckpts")]
    return runner.invoke(
        app,
        ["analyze", *ckpts, "--model", f"{project / 'usermodels.py'}:make_model",
         "--data", f"{project / 'usermodels.py'}:train_data", "--heldout", f"{project / 'usermodels.py'}:heldout_data",
         "--out", str(out), *FAST, *extra],
    )  # fmt: skip


def test_help_explains_every_option():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("demo", "analyze", "spectrum", "report"):
        assert cmd in res.output
    res = runner.invoke(app, ["analyze", "--help"])
    for opt in ("--model", "--data", "--heldout", "--loss", "--out", "--config", "--steps", "--probes", "--seed",
                "--device", "--json", "--quiet", "--overwrite", "--trust-pickle"):  # fmt: skip
        assert opt in res.output, opt


def test_analyze_writes_results_report_and_resumes(project, tmp_path):
    out = tmp_path / "out"
    res = _analyze(project, out, "--quiet")
    assert res.exit_code == 0, res.output
    t = pd.read_csv(out / "results.csv")
    assert list(t["epoch"]) == [0, 1, 2, 3]
    for col in ("checkpoint", "epoch", "lambda_min", "lambda_max", "trace", "re", "kh05", "ct", "hesd_type"):
        assert t[col].notna().all(), col
    assert (out / "report.html").exists() and (out / "landscape.json").exists()
    first = t.drop(columns=["seconds"])
    res = _analyze(project, out, "--json")
    assert res.exit_code == 0
    payload = json.loads(res.output)
    assert len(payload["results"]) == 4 and "highest_ct_mp" in payload["selections"]
    pd.testing.assert_frame_equal(first, pd.read_csv(out / "results.csv").drop(columns=["seconds"]))


def test_analyze_from_toml_config(project, tmp_path):
    cfg = tmp_path / "hesd.toml"
    cfg.write_text(textwrap.dedent(f"""
        [hesd]
        checkpoints = ["{project / 'ckpts' / 'epoch_00*.pt'}"]
        model = "{project / 'usermodels.py'}:make_model"
        data = "{project / 'usermodels.py'}:train_data"
        out = "{tmp_path / 'cfgout'}"
        steps = 10
        probes = 1
    """))  # fmt: skip
    res = runner.invoke(app, ["analyze", "--config", str(cfg), "--quiet", "--no-landscape", "--no-report"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "cfgout" / "manifest.json").read_text())
    assert manifest["settings"]["analysis"]["num_steps"] == 10


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('overwrite = "false"', "overwrite must be true or false, got str 'false'"),
        ('distributed = "false"', "distributed must be true or false"),
        ('steps = "ten"', "steps must be an integer, got str 'ten'"),
        ("steps = 2.5", "steps must be an integer, got float 2.5"),
        ("stepz = 10", "unknown key 'stepz' (did you mean 'steps'?)"),
        ("landscpe = false", "unknown key 'landscpe' (did you mean 'landscape'?)"),
    ],
)
def test_config_values_are_checked_strictly(tmp_path, line, message):
    """A config value of the wrong type was read with bool()/int(): overwrite = "false" deleted results."""
    cfg = tmp_path / "hesd.toml"
    cfg.write_text(f'[hesd]\nmodel = "m:f"\ndata = "m:d"\nout = "{tmp_path / "o"}"\n{line}\n')
    res = runner.invoke(app, ["analyze", "x.pt", "--config", str(cfg)])
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "o").exists()


def test_config_landscape_and_report_keys_are_honoured(project, tmp_path):
    cfg = tmp_path / "hesd.toml"
    cfg.write_text(textwrap.dedent(f"""
        checkpoints = ["{project / 'ckpts' / 'epoch_001.pt'}"]
        model = "{project / 'usermodels.py'}:make_model"
        data = "{project / 'usermodels.py'}:train_data"
        out = "{tmp_path / 'o'}"
        steps = 5
        probes = 1
        landscape = false
        report = false
    """))  # fmt: skip
    res = runner.invoke(app, ["analyze", "--config", str(cfg), "--quiet"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "o" / "report.html").exists() and not (tmp_path / "o" / "landscape.json").exists()


@pytest.mark.parametrize(
    ("model_spec", "message"),
    [
        ("nosuchmodule_xyz:make", "cannot import module 'nosuchmodule_xyz'"),
        ("{p}:nosuch", "has no attribute 'nosuch'"),
        ("{p}:broken_factory", "raised RuntimeError: cannot build the network"),
        ("no_colon", "expects MODULE:ATTR"),
    ],
)
def test_bad_model_spec_exit_2(project, tmp_path, model_spec, message):
    p = project / "usermodels.py"
    res = runner.invoke(
        app, ["analyze", str(project / "ckpts"), "--model", model_spec.format(p=p), "--data", f"{p}:train_data",
              "--out", str(tmp_path / "o"), *FAST],
    )  # fmt: skip
    assert res.exit_code == 2
    assert message in res.output


def test_no_checkpoints_and_unwritable_out_exit_2(project, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _analyze(project, tmp_path / "o", checkpoints=[str(empty)])
    assert res.exit_code == 2 and "holds no checkpoint files" in res.output
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    res = _analyze(project, blocker / "sub")
    assert res.exit_code == 2 and "cannot create the results folder" in res.output
    res = runner.invoke(app, ["analyze", str(project / "ckpts")])
    assert res.exit_code == 2 and "missing --model, --data, --out" in res.output


def test_non_finite_checkpoint_exit_1_and_rest_kept(project, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    sd = torch.load(project / "ckpts" / "epoch_001.pt", weights_only=True)
    torch.save(sd, ck / "epoch_001.pt")
    bad = {k: v.clone() for k, v in sd.items()}
    bad["net.1.weight"][0, 0] = float("nan")
    torch.save(bad, ck / "epoch_002.pt")
    out = tmp_path / "o"
    res = _analyze(project, out, "--quiet", checkpoints=[str(ck)])
    assert res.exit_code == 1
    assert "epoch_002.pt" in res.output and "loss is nan" in res.output
    t = pd.read_csv(out / "results.csv")
    assert t["status"].tolist() == ["ok", "failed"]


def test_settings_mismatch_exit_2(project, tmp_path):
    out = tmp_path / "o"
    assert _analyze(project, out, "--quiet", "--no-landscape", "--no-report").exit_code == 0
    res = _analyze(project, out, "--seed", "3", "--quiet")
    assert res.exit_code == 2 and "other settings" in res.output and "--overwrite" in res.output


def test_spectrum_command(project, tmp_path):
    p = project / "usermodels.py"
    ckpt = project / "ckpts" / "epoch_003.pt"
    args = ["spectrum", str(ckpt), "--model", f"{p}:make_model", "--data", f"{p}:train_data", *FAST]
    res = runner.invoke(app, [*args, "--plot", str(tmp_path / "d.png")])
    assert res.exit_code == 0, res.output
    assert "HESD (Ct" in res.output and (tmp_path / "d.png").stat().st_size > 1000
    res = runner.invoke(app, [*args, "--json"])
    d = json.loads(res.output)
    assert d["hesd_type"] in ("MP", "MN") and len(d["spectrum"]["values"]) == 2
    assert runner.invoke(app, [*args, "--quiet"]).output.strip() in ("MP", "MN")
    res = runner.invoke(app, ["spectrum", str(tmp_path / "missing.pt"), "--model", f"{p}:make_model",
                              "--data", f"{p}:train_data"])  # fmt: skip
    assert res.exit_code == 2 and "no such checkpoint file" in res.output


def test_report_command_rebuilds_without_recomputing(project, tmp_path):
    out = tmp_path / "o"
    assert _analyze(project, out, "--quiet").exit_code == 0
    (out / "report.html").unlink()
    rows_before = {f.name: f.stat().st_mtime_ns for f in (out / "rows").iterdir()}
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0 and (out / "report.html").exists()
    assert rows_before == {f.name: f.stat().st_mtime_ns for f in (out / "rows").iterdir()}
    assert runner.invoke(app, ["report", str(tmp_path)]).exit_code == 0  # a folder of results folders
    (tmp_path / "nothing").mkdir()
    res = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "holds no hesd results" in res.output


def test_console_script_demo_quick(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "hesd")
    res = subprocess.run([exe, "demo", "--quick", "--out", str(tmp_path / "demo"), "--json"], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr
    payload = json.loads(res.stdout)
    assert set(payload["runs"]) == {"sgd_momentum", "clipped"}
    assert os.path.exists(payload["report"])
    assert "\r" not in res.stderr  # no progress bars when not on a terminal


def test_a_generator_data_factory_serves_every_checkpoint_and_the_landscape(project, tmp_path):
    p = project / "usermodels.py"
    res = runner.invoke(
        app,
        ["analyze", str(project / "ckpts"), "--model", f"{p}:make_model", "--data", f"{p}:train_generator",
         "--out", str(tmp_path / "gen"), *FAST, "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "gen" / "results.csv")
    assert (table["status"] == "ok").all() and len(table) == 4
    assert (tmp_path / "gen" / "landscape.json").exists()


def test_process_group_timeout_is_set_and_checked(monkeypatch):
    """torch's default collective timeout is 30 minutes: a stopped rank held the job that long."""
    import torch.distributed as dist
    import typer

    from hesd.interfaces.cli_support import init_distributed

    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("HESD_DIST_TIMEOUT", "42")
    init_distributed(True, None)
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 42
    monkeypatch.setenv("HESD_DIST_TIMEOUT", "soon")
    with pytest.raises(typer.Exit):
        init_distributed(True, None)


def test_finite_difference_products_from_the_command_line(project, tmp_path):
    """--hvp-method reaches the products, is part of the folder's settings (never mixed), and is checked."""
    out = tmp_path / "fd"
    res = _analyze(project, out, "--quiet", "--no-landscape", "--no-report", "--hvp-method", "finite_difference")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["settings"]["analysis"]["hvp_method"] == "finite_difference"
    res = _analyze(project, out, "--quiet", "--no-landscape", "--no-report")  # auto: other products, refused
    assert res.exit_code == 2 and "hvp_method" in res.output and "--overwrite" in res.output
    exact = tmp_path / "exact"
    assert _analyze(project, exact, "--quiet", "--no-landscape", "--no-report").exit_code == 0
    a, b = pd.read_csv(out / "results.csv"), pd.read_csv(exact / "results.csv")
    assert (abs(a["train_loss"] - b["train_loss"]) < 1e-6).all()
    assert (abs(a["lambda_max"] - b["lambda_max"]) < 2e-2 * abs(b["lambda_max"])).all()
    res = _analyze(project, tmp_path / "bad", "--hvp-method", "fd")
    assert res.exit_code == 2 and "hvp_method must be one of" in res.output and "finite_difference" in res.output
    p = project / "usermodels.py"
    args = ["spectrum", str(project / "ckpts" / "epoch_003.pt"), "--model", f"{p}:make_model", "--data"]
    res = runner.invoke(app, [*args, f"{p}:train_data", *FAST, "--hvp-method", "finite_difference", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["hesd_type"] in ("MP", "MN")


def test_a_memory_budget_no_plan_fits_stops_before_any_checkpoint(project, tmp_path):
    out = tmp_path / "mem"
    res = _analyze(project, out, "--max-memory", "20K", "--no-landscape")
    assert res.exit_code == 2, res.output
    assert "no plan fits" in res.output and "analysed parameters" in res.output and "--max-memory" in res.output
    assert not (out / "rows").exists() or not any((out / "rows").iterdir())


def test_printed_summary_names_each_checkpoint_and_covers_the_whole_folder(project, tmp_path):
    """The summary had no name column; with --no-report a second invocation's tables held only its own rows."""
    out = tmp_path / "two"
    ck = project / "ckpts"
    first = _analyze(project, out, "--no-landscape", "--no-report", checkpoints=[str(ck / "epoch_002.pt")])
    assert first.exit_code == 0, first.output
    res = _analyze(project, out, "--no-landscape", "--no-report", checkpoints=[str(ck / "epoch_003.pt")])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    header = next(line for line in lines if "lambda_max" in line)
    assert header.split()[:2] == ["name", "epoch"]
    assert any(line.split()[:1] == ["epoch_002.pt"] for line in lines)  # the earlier invocation's row too
    assert len(pd.read_csv(out / "results.csv")) == 2
