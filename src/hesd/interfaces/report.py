"""The HTML report: figures (PNG and SVG), the results table and the settings, in one offline file.

:func:`build_report` reads one results folder (written by ``hesd analyze``, the
:class:`hesd.Monitor` or :func:`hesd.analyze_checkpoints`) or a folder of several (one per
training run, as ``hesd demo`` writes) and never recomputes anything.
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .._version import __version__
from ..algorithms.spectrum import Spectrum
from ..analysis.decision import decide, gap_text, series_unit
from ..analysis.rows import VIEWS, build_table, records
from ..analysis.settings import AnalysisSettings
from ..analysis.store import ResultStore, atomic_write_bytes, atomic_write_text
from ..errors import HesdFileNotFoundError

__all__ = ["SeriesData", "build_report", "find_series", "load_series"]

_RULE_STYLE = {
    "highest_ct_mp": ("Highest Ct among MP (paper)", "tab:green"),
    "smallest_lambda_max": ("Smallest λmax (classic)", "tab:orange"),
    "best_heldout": ("Best held-out (oracle)", "tab:purple"),
}


@dataclass
class SeriesData:
    """Everything the report needs about one analysed series."""

    label: str
    root: Path
    table: pd.DataFrame
    selections: dict[str, dict]
    spectra: dict[str, Spectrum]
    settings: dict
    manifest: dict
    landscape: dict | None


def _sort_key(row: dict) -> tuple:
    e = row.get("epoch")
    return (e is None, e if e is not None else 0, str(row.get("name", "")))


def load_series(root: str | Path, label: str | None = None) -> SeriesData:
    """Load one results folder without recomputing anything."""
    store = ResultStore.open_existing(root)
    stored = store.settings
    analysis = dict(stored.get("analysis", stored))
    settings = AnalysisSettings(**analysis)
    rows = sorted(store.rows(), key=_sort_key)
    if not rows:
        raise HesdFileNotFoundError(f"load_series: {root} holds no analysed checkpoints yet")
    table, selections, spectra = build_table(rows, settings)
    land_path = Path(root) / "landscape.json"
    landscape = json.loads(land_path.read_text()) if land_path.exists() else None
    return SeriesData(
        label or Path(root).name, Path(root), table, selections, spectra, analysis, store.manifest, landscape
    )


def find_series(root: str | Path) -> list[Path]:
    """The results folders at ``root``: itself, or its immediate sub-folders holding a manifest."""
    root = Path(root)
    if (root / "manifest.json").exists():
        return [root]
    subs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "manifest.json").exists()) if root.is_dir() else []
    if not subs:
        raise HesdFileNotFoundError(
            f"build_report: {root} holds no hesd results (no manifest.json in it or its sub-folders); "
            "run `hesd analyze ... --out DIR` first"
        )
    return subs


# ---------------------------------------------------------------------------------------------- figures
def _fig_density(series: SeriesData):
    ok = series.table[series.table["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    specs = [series.spectra[c] for c in ok["checkpoint"] if c in series.spectra]
    if not specs:
        ax.text(0.5, 0.5, "no spectra", ha="center", transform=ax.transAxes)
        return fig
    lo = min(s.lambda_min for s in specs)
    hi = max(s.lambda_max for s in specs)
    pad = 0.05 * (hi - lo + 1e-12)
    grid = np.linspace(lo - pad, hi + pad, 1500)
    sigma = max(0.01 * (hi - lo), 1e-12)
    cmap = plt.get_cmap("viridis")
    epochs = ok["epoch"].tolist()
    for i, (spec, ep) in enumerate(zip(specs, epochs, strict=False)):
        _, d = spec.density(grid, sigma)
        ax.plot(grid, np.maximum(d, 1e-10), color=cmap(i / max(len(specs) - 1, 1)), lw=1.2,
                label=f"{series_unit(ok)} {ep}" if ep is not None and not pd.isna(ep) else f"#{i}")  # fmt: skip
    ax.axvline(0, color="k", lw=0.8, ls=":")
    ax.axvspan(grid[0], 0, color="tab:red", alpha=0.06, label="negative curvature")
    ax.set_yscale("log")
    ax.set_ylim(1e-8, None)
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("smoothed density (log)")
    ax.set_title(f"{series.label}: HESD per checkpoint (σ = {sigma:.3g})")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    return fig


def _fig_criteria(series: SeriesData):
    t = series.table[series.table["status"] == "ok"]
    thr = float(series.settings.get("ct_threshold", -0.6))
    has_acc = "heldout_accuracy" in t and t["heldout_accuracy"].notna().any()
    has_loss = "heldout_loss" in t and t["heldout_loss"].notna().any()
    n = 4 if has_acc or has_loss else 3
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.3 * n), sharex=True)
    x = t["epoch"].astype(float).to_numpy() if t["epoch"].notna().all() else np.arange(len(t), dtype=float)
    ax = axes[0]
    ct = t["ct"].to_numpy(dtype=float)
    ax.plot(x, ct, "o-", color="k", label="Ct")
    ax.axhline(thr, color="tab:red", ls="--", lw=1, label=f"threshold {thr}")
    ymin = min(np.nanmin(np.where(np.isfinite(ct), ct, thr)), thr) - 0.1
    ax.axhspan(thr, 0.05, color="tab:green", alpha=0.08, label="MP")
    ax.axhspan(ymin, thr, color="tab:red", alpha=0.08, label="MN")
    ax.set_ylim(ymin, 0.05)
    qs = t["qs_flag"].astype(bool).to_numpy()
    if qs.any():
        ax.plot(x[qs], ct[qs], "x", color="tab:blue", ms=10, mew=2, label="quasi-singular")
    ax.set_ylabel("Ct")
    ax.legend(fontsize=7, loc="lower left", ncol=3)
    ax = axes[1]
    ax.plot(x, t["re"], "o-", label="re")
    ax.plot(x, t["kh05"], "s-", label="KH05")
    ax.set_ylabel("criterion")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.plot(x, t["lambda_max"], "o-", color="tab:blue", label="λmax")
    ax.plot(x, t["lambda_min"], "o-", color="tab:red", label="λmin")
    ax.set_yscale("symlog", linthresh=max(1e-3, float(np.nanmax(np.abs(t["lambda_min"]))) / 10))
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel("eigenvalue")
    ax.legend(fontsize=7)
    if has_acc:
        ax = axes[3]
        ax.plot(x, t["heldout_accuracy"], "o-", color="tab:purple")
        ax.set_ylabel("held-out acc.")
    elif has_loss:  # no accuracy (a language model, a regression): the losses
        ax = axes[3]
        ax.plot(x, t["heldout_loss"], "o-", color="tab:purple", label="held-out loss")
        ax.plot(x, t["train_loss"], "s--", color="tab:gray", label="train loss")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7, loc="best")
    for rule, sel in series.selections.items():
        if sel.get("checkpoint") is None:
            continue
        label, color = _RULE_STYLE.get(rule, (rule, "gray"))
        row = t[t["checkpoint"] == sel["checkpoint"]]
        if row.empty:
            continue
        if t["epoch"].notna().all():
            xe = float(row["epoch"].iloc[0])
        else:
            xe = float(np.flatnonzero(t["checkpoint"] == sel["checkpoint"])[0])
        for a in axes:
            a.axvline(xe, color=color, lw=1.5, alpha=0.7, label=label if a is axes[-1] else None)
    axes[-1].set_xlabel(series_unit(t))
    if any(s.get("checkpoint") for s in series.selections.values()):
        axes[-1].legend(fontsize=7, loc="lower right")
    axes[0].set_title(f"{series.label}: criteria over training")
    fig.tight_layout()
    return fig


def _fig_landscape(series: SeriesData):
    land = series.landscape
    assert land is not None  # drawn only for a series with a stored landscape
    fig, axes = plt.subplots(2, 2, figsize=(9, 7.5))
    lam = land["eigenvalues"]
    loss0 = land["loss0"]
    for col, key, title in ((0, "eigen", "top Hessian eigenvectors"), (1, "random", "filter-normalised random")):
        part = land[key]
        t = np.asarray(part["t"])
        ax = axes[0, col]
        for i, curve in enumerate(part["curves"]):
            ax.plot(t, curve, "o-", ms=3, label=f"direction {i + 1}" + (f" (λ={lam[i]:.3g})" if key == "eigen" else ""))
            if key == "eigen":
                ax.plot(t, loss0 + 0.5 * lam[i] * t**2, "--", lw=1, color=f"C{i}", label=f"λ{i + 1}/2·t²")
        ax.set_title(f"1-D slices: {title}", fontsize=9)
        ax.set_xlabel("t")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
        ax = axes[1, col]
        g = np.asarray(part["grid"])
        surf = np.asarray(part["surface"])
        cs = ax.contourf(g, g, surf, levels=20, cmap="viridis")
        ax.contour(g, g, surf, levels=10, colors="k", linewidths=0.4)
        fig.colorbar(cs, ax=ax)
        ax.plot([0], [0], "r*", ms=10)
        ax.set_title(f"2-D slice: {title}", fontsize=9)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
    fig.suptitle(f"{series.label}: loss landscape around {Path(land['checkpoint']).name} ({land['rule']})", fontsize=10)
    fig.tight_layout()
    return fig


def _save(fig, figdir: Path, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    png = buf.getvalue()
    atomic_write_bytes(figdir / f"{name}.png", png)
    svg = io.BytesIO()
    fig.savefig(svg, format="svg")
    atomic_write_bytes(figdir / f"{name}.svg", svg.getvalue())
    plt.close(fig)
    return base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------------------------------------- html
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{margin-bottom:0}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.MP{color:#1a7f37;font-weight:600}.MN{color:#cf222e;font-weight:600}
.failed{background:#fff0f0}img{max-width:100%;border:1px solid #eee}.note{color:#555;font-size:13px}
.pick{background:#f6f6f6;border-left:4px solid #888;padding:.5em 1em;margin:.5em 0}
.pick.good{background:#f6fff6;border-color:#1a7f37}.pick.fair{background:#fffbea;border-color:#bf8700}
.pick.poor{background:#fff0f0;border-color:#cf222e}.flag{color:#cf222e;font-size:13px}
.headline{font-size:17px;background:#f6f8fa;border:1px solid #d0d7de;padding:.7em 1em;margin:1em 0}
.warn{color:#9a6700;font-size:14px;margin:.2em 0 .2em 1em}
code{background:#f3f3f3;padding:1px 4px}
"""


def _headline_html(label: str | None, d: Any) -> str:
    """The decision sentence and its warnings (``label``: the series, in a multi-series page)."""
    prefix = f"<b>{html.escape(label)}</b>: " if label else ""
    warns = "".join(f"<div class='warn'>⚠ {html.escape(w)}</div>" for w in d.warnings)
    return f"<div class='headline'>{prefix}{html.escape(d.sentence)}{warns}</div>"


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table_html(t: pd.DataFrame) -> str:
    cols = [c for c in VIEWS["report"] if c in t]
    head = "".join(f"<th class='l'>{html.escape(c)}</th>" if c in ("name", "error") else f"<th>{c}</th>" for c in cols)
    body = []
    for _, r in t.iterrows():
        cells = []
        for c in cols:
            cls = "l" if c in ("name", "error") else ""
            if c == "hesd_type" and r[c] in ("MP", "MN"):  # a class name only from the known values
                cls += f" {r[c]}"
            cells.append(f"<td class='{cls.strip()}'>{_fmt(r[c])}</td>")
        body.append(f"<tr class='{'failed' if r.get('status') != 'ok' else ''}'>{''.join(cells)}</tr>")
    return f"<table class='results'><tr>{head}</tr>{''.join(body)}</table>"


def _versions() -> dict[str, str]:
    import matplotlib as mpl
    import scipy
    import torch

    return {"hesd": __version__, "torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "pandas": pd.__version__, "matplotlib": mpl.__version__, "python": platform.python_version(),
            "platform": platform.platform()}  # fmt: skip


def build_report(root: str | Path, out: str | Path | None = None, title: str = "hesd report") -> Path:
    """Build ``report.html`` (and ``figures/*.png|svg``, ``results.csv|json`` per series) from stored results.

    Args:
        root: a results folder, or a folder of results folders (one per training run).
        out: where to write the HTML (default ``root/report.html``).
        title: page title.

    Returns:
        The path of the HTML file.
    """
    root = Path(root)
    series = [load_series(p, label=p.name if p != root else None) for p in find_series(root)]
    out = Path(out) if out else root / "report.html"
    figdir = out.parent / "figures"
    parts = [f"<h1>{html.escape(title)}</h1><p class='note'>Generated {time.strftime('%Y-%m-%d %H:%M')} by hesd "
             f"{__version__} from {html.escape(str(root))}. Criteria: re = |λmin/λmax|, KH05 = Σ<sub>λ&lt;0</sub>"
             "|λw|<sup>0.5</sup> / Σ<sub>λ&gt;0</sub>(λw)<sup>0.5</sup>, Ct = min λ<sub>neg</sub> / max "
             "λ<sub>pos</sub> on raw Ritz values, averaged over probes; MP (mainly positive) when Ct &gt; "
             "threshold, where curvature-based generalisation analysis applies.</p>"]  # fmt: skip
    summary = ["<h2>Summary</h2><table><tr><th class='l'>series</th><th>checkpoints</th><th>MP</th><th>MN</th>"
               "<th>quasi-singular</th><th>failed</th><th class='l'>paper's pick (highest Ct among MP)</th>"
               "<th class='l'>smallest λmax pick</th></tr>"]  # fmt: skip
    sections: list[str] = []
    headlines: list[str] = []
    for s in series:
        t = s.table
        ok = t[t["status"] == "ok"]
        picks = []
        for rule in ("highest_ct_mp", "smallest_lambda_max"):
            sel = s.selections.get(rule, {})
            txt = f"{series_unit(t)} {sel['epoch']}" if sel.get("checkpoint") else "none"
            if sel.get("heldout_accuracy") is not None:
                txt += f" (held-out acc. {sel['heldout_accuracy']:.3f})"
            elif sel.get("heldout_loss") is not None:
                txt += f" (held-out loss {sel['heldout_loss']:.3f})"
            picks.append(html.escape(txt))
        summary.append(
            f"<tr><td class='l'>{html.escape(s.label)}</td><td>{len(t)}</td><td>{int((ok['hesd_type'] == 'MP').sum())}"
            f"</td><td>{int((ok['hesd_type'] == 'MN').sum())}</td><td>{int(ok['qs_flag'].sum())}</td>"
            f"<td>{int((t['status'] != 'ok').sum())}</td><td class='l'>{picks[0]}</td>"
            f"<td class='l'>{picks[1]}</td></tr>"
        )
        slug = "".join(ch if ch.isalnum() else "_" for ch in s.label) or "series"
        imgs = [("density", _fig_density(s)), ("criteria", _fig_criteria(s))] if len(ok) else []
        if s.landscape and len(ok):
            imgs.append(("landscape", _fig_landscape(s)))
        figs_html = (
            "".join(
                f"<h3>{name.title()}</h3><img alt='{name} {html.escape(s.label)}' "
                f"src='data:image/png;base64,{_save(fig, figdir, f'{slug}_{name}')}'>"
                for name, fig in imgs
            )
            or "<p class='note'>No checkpoint of this series was analysed successfully: no figures. The "
            "errors are in the table below.</p>"
        )
        decision = decide(t, s.selections, series_unit(t))
        headlines.append(_headline_html(s.label if len(series) > 1 else None, decision))
        sel_html = "".join(
            f"<div class='pick {decision.grades.get(r, 'good' if r == 'best_heldout' else 'unknown')}'>"
            f"<b>{html.escape(_RULE_STYLE.get(r, (r,))[0])}</b>: "
            f"{html.escape(Path(v['checkpoint']).name) if v.get('checkpoint') else '<i>no pick</i>'} — "
            f"{html.escape(v['reason'] + ('' if r == 'best_heldout' or not gap_text(v) else '; ' + gap_text(v)))}"
            + "".join(f"<div class='flag'>⚠ {html.escape(f)}</div>" for f in decision.flags.get(r, []))
            + "</div>"
            for r, v in s.selections.items()
        )
        settings_html = html.escape(json.dumps(s.manifest, indent=1))
        sections.append(
            f"<h2>Series: {html.escape(s.label)}</h2><h3>Selection</h3>{sel_html}{figs_html}"
            f"<h3>Results</h3>{_table_html(t)}<p class='note'>Full table: "
            f"<code>{html.escape(str(s.root / 'results.csv'))}</code></p>"
            f"<h3>Settings</h3><pre>{settings_html}</pre>"
        )
        ResultStore.open_existing(s.root).write_tables(records(t))  # the tables follow the rebuilt flags
    summary.append("</table>")
    versions = "".join(f"<tr><td class='l'>{k}</td><td class='l'>{html.escape(v)}</td></tr>" for k, v in
                       _versions().items())  # fmt: skip
    doc = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>{''.join(parts)}"
           f"{''.join(headlines)}{''.join(summary)}{''.join(sections)}"
           f"<h2>Versions</h2><table>{versions}</table></body></html>")  # fmt: skip
    atomic_write_text(out, doc)
    return out
