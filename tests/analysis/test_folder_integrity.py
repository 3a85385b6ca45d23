"""A results folder is one series, hesd's own, and read back with checks (issue #20)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import hesd
from helpers import make_series
from hesd.analysis.rows import check_row
from hesd.analysis.store import ForeignFolderError, ResultStore
from hesd.interfaces.cli import app
from hesd.models import DigitsMLP

FAST = hesd.AnalysisSettings(num_steps=5, num_probes=1, refine_extremes=False)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return make_series(tmp_path_factory.mktemp("ckpts"), 3)


def test_the_tables_and_picks_cover_every_invocation_of_a_folder(series, tmp_path):
    """Two invocations on one folder (other checkpoints each): results.csv, selection.json and the
    returned table hold both, as the report does (they held only the last invocation's rows)."""
    d, train, held = series
    out = tmp_path / "one"
    hesd.analyze_checkpoints(DigitsMLP, [d / "epoch_2.pt", d / "epoch_3.pt"], train, heldout=held, out_dir=out,
                             settings=FAST)  # fmt: skip
    res = hesd.analyze_checkpoints(DigitsMLP, [d / "epoch_1.pt"], train, heldout=held, out_dir=out, settings=FAST)
    assert res.table["name"].tolist() == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]  # series order
    csv = (out / "results.csv").read_text().splitlines()
    assert len(csv) == 1 + 3
    picked = json.loads((out / "selection.json").read_text())["smallest_lambda_max"]
    assert picked["checkpoint"] == res.table.loc[res.table["lambda_max"].idxmin(), "checkpoint"]
    assert "of 3 checkpoints" in picked["reason"]


def test_a_folder_hesd_did_not_create_is_refused_and_left_as_it_was(series, tmp_path):
    d, train, _ = series
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("my own table\n")
    (mine / "report.html").write_text("<p>mine</p>")
    with pytest.raises(ForeignFolderError, match=r"results\.csv.*Choose another output folder"):
        hesd.analyze_checkpoints(DigitsMLP, d, train, out_dir=mine, settings=FAST)
    assert (mine / "results.csv").read_text() == "my own table\n" and sorted(p.name for p in mine.iterdir()) == [
        "report.html", "results.csv"]  # fmt: skip
    other = tmp_path / "other"  # a foreign manifest.json and rows/: kept even with overwrite
    (other / "rows").mkdir(parents=True)
    (other / "manifest.json").write_text(json.dumps({"name": "someone else's"}))
    (other / "rows" / "a.json").write_text("{}")
    with pytest.raises(ForeignFolderError, match="not a manifest hesd wrote"):
        hesd.analyze_checkpoints(DigitsMLP, d, train, out_dir=other, settings=FAST, overwrite=True)
    assert (other / "rows" / "a.json").exists() and "someone" in (other / "manifest.json").read_text()
    empty = tmp_path / "empty"  # a new or empty folder is fine
    empty.mkdir()
    assert len(hesd.analyze_checkpoints(DigitsMLP, d, train, out_dir=empty, settings=FAST).table) == 3


@pytest.mark.parametrize("manifest", ["[1]", "{bad", '"text"'])
def test_a_damaged_manifest_is_a_clear_error_for_report_and_analyze(manifest, series, tmp_path):
    d, train, _ = series
    out = tmp_path / "r"
    out.mkdir()
    (out / "manifest.json").write_text(manifest)
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 2 and "manifest.json" in res.output and "Traceback" not in res.output, res.output
    with pytest.raises(ForeignFolderError, match="manifest.json"):
        hesd.analyze_checkpoints(DigitsMLP, d, train, out_dir=out, settings=FAST)


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("hesd_type", "MP'><img src=x onerror=alert(1)>", "hesd_type"),
        ("status", "done", "status"),
        ("lambda_max", "<b>4</b>", "lambda_max holds str"),
        ("name", 3, "name holds int"),
        ("checkpoint", None, "checkpoint"),
    ],
)
def test_rows_read_back_are_checked(key, value, why, series, tmp_path):
    """Rows reach the report and the rules: a row whose values are not hesd's is refused, naming the file."""
    d, train, _ = series
    out = tmp_path / "r"
    hesd.analyze_checkpoints(DigitsMLP, d, train, out_dir=out, settings=FAST)
    row_file = sorted((out / "rows").glob("*.json"))[0]
    row = json.loads(row_file.read_text())
    row[key] = value
    row_file.write_text(json.dumps(row))
    with pytest.raises(ForeignFolderError, match=why) as err:
        ResultStore.open_existing(out).rows()
    assert row_file.name in str(err.value) and "Remove the file" in str(err.value)
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 2 and row_file.name in res.output


def test_check_row_accepts_what_hesd_writes(series):
    d, train, _ = series
    res = hesd.analyze_checkpoints(DigitsMLP, d, train, settings=FAST)
    for r in res.table.to_dict(orient="records"):
        assert check_row({k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}) == ""
