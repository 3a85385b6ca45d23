"""The HTML report: structure, figures, table, and a real render in headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from bs4 import BeautifulSoup
from typer.testing import CliRunner

from hesd.interfaces.cli import app
from hesd.interfaces.report import build_report


@pytest.fixture(scope="module")
def results(project, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    p = project / "usermodels.py"
    res = CliRunner().invoke(
        app, ["analyze", str(project / "ckpts"), "--model", f"{p}:make_model", "--data", f"{p}:train_data",
              "--heldout", f"{p}:heldout_data", "--out", str(out), "--steps", "15", "--probes", "2", "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


def test_report_holds_every_figure_and_the_table(results):
    html = build_report(results, title="test report")
    soup = BeautifulSoup(html.read_text(), "html.parser")
    assert soup.title.string == "test report"
    imgs = soup.find_all("img")
    alts = " ".join(i["alt"] for i in imgs)
    for name in ("density", "criteria", "landscape"):
        assert name in alts
    for img in imgs:
        assert img["src"].startswith("data:image/png;base64,") and len(img["src"]) > 5000  # embedded, offline
    assert not soup.find_all(["script", "link"])  # nothing to fetch
    table = soup.find("table", class_="results")
    assert len(table.find_all("tr")) == 1 + 4  # header + one row per checkpoint
    text = soup.get_text()
    assert "Highest Ct among MP (paper)" in text and "Smallest λmax (classic)" in text and "Versions" in text
    for stem in ("run_density", "run_criteria", "run_landscape"):
        for ext in ("png", "svg"):
            assert (results / "figures" / f"{stem}.{ext}").stat().st_size > 1000
    assert (results / "results.csv").exists() and (results / "results.json").exists()


def test_report_renders_in_headless_chromium(results, tmp_path):
    import matplotlib.image as mpimg

    if shutil.which("chromium") is None:
        if os.environ.get("HESD_REQUIRE_CHROMIUM"):
            pytest.fail("HESD_REQUIRE_CHROMIUM is set but chromium is not on PATH")
        pytest.skip("Chromium is not installed (apt-get install chromium); the HTML structure is tested above")

    html = build_report(results)
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
         "--window-size=1200,2400", f"--screenshot={shot}", html.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[0] == 2400 and img.shape[1] == 1200
    assert img.std() > 0.05  # not blank
    nonwhite = (img < 0.9).any(axis=2).mean()
    assert nonwhite > 0.05  # text and figures drawn
    colourful = (np.ptp(img, axis=2) > 0.2).mean()
    assert colourful > 0.005  # the plots (not just black text) rendered


HOSTILE = "MP'><img src=x onerror=\"document.title='PWNED'\"><span class='"


def test_hostile_strings_in_stored_rows_are_escaped(results, tmp_path):
    """A results folder is shared between people: a row whose text fields hold markup must reach the
    page as text. Checked in the parsed HTML and, where Chromium is installed, in the DOM after a
    real browser ran the page (an executed handler would have renamed it)."""
    import json

    copy = tmp_path / "shared"
    shutil.copytree(results, copy)
    rows = sorted((copy / "rows").glob("*.json"))
    row = json.loads(rows[0].read_text())
    for key in ("name", "qs_reason", "type_reason"):  # free text; hesd_type is checked on reading
        row[key] = HOSTILE
    row["hesd_type"], row["qs_flag"] = "undetermined", True  # so both reasons reach the page, as tooltips
    rows[0].write_text(json.dumps(row))
    failed = json.loads(rows[1].read_text())
    failed.update(status="failed", error=HOSTILE, name=HOSTILE, checkpoint=f"/x/{HOSTILE}/epoch_9.pt")
    rows[1].write_text(json.dumps(failed))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["settings"]["analysis"]["params"] = [HOSTILE]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    page = build_report(copy, title=HOSTILE)
    soup = BeautifulSoup(page.read_text(), "html.parser")
    assert not soup.find_all("script")
    for tag in soup.find_all(True):
        assert not [a for a in tag.attrs if a.lower().startswith("on")], tag
    assert all(img["src"].startswith("data:image/png") for img in soup.find_all("img"))
    assert HOSTILE in soup.get_text()  # shown as text
    assert soup.find("td", class_="undetermined")["title"] == HOSTILE  # attribute values escaped too
    assert any(HOSTILE in td.get_text() for td in soup.select("table.settings td"))
    if shutil.which("chromium") is None:
        if os.environ.get("HESD_REQUIRE_CHROMIUM"):
            pytest.fail("HESD_REQUIRE_CHROMIUM is set but chromium is not on PATH")
        return
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    title = BeautifulSoup(proc.stdout, "html.parser").title.string
    assert title == HOSTILE  # an executed onerror handler would have set it to 'PWNED'


def test_report_names_the_run_shows_the_trace_with_its_error_and_the_settings_as_a_table(results):
    """#19: series named after their run (the checkpoints' folder), the SLQ trace never bare, settings readable."""
    soup = BeautifulSoup(build_report(results).read_text(), "html.parser")
    assert soup.find("h2", string="Series: ckpts")  # the run's folder, not the results folder ("run")
    table = soup.find("table", class_="results")
    assert "trace ± se" in [th.get_text() for th in table.find_all("th")]
    traces = [tr.find_all("td")[5].get_text() for tr in table.find_all("tr")[1:]]
    assert all(" ± " in t for t in traces), traces
    settings = {tr.find_all("td")[0].get_text(): tr.find_all("td")[1].get_text()
                for tr in soup.select("table.settings tr")}  # fmt: skip
    assert settings["analysis.num_steps"] == "15" and settings["analysis.num_probes"] == "2"
    assert "inputs.data" in settings and not soup.find("pre")  # no JSON dump
