"""The HTML report: figures (PNG and SVG), the results table and the settings, in one offline file.

:func:`build_report` reads one results folder (written by ``hesd analyze``, the
:class:`hesd.Monitor` or :func:`hesd.analyze_checkpoints`) or a folder of several (one per
training run, as ``hesd demo`` writes) and never recomputes anything.
"""

from __future__ import annotations

import base64
import io
import json
import os
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
from ..analysis.evidence import reliability_text, study_note
from ..analysis.rows import VIEWS, build_table, records, series_order, trace_text
from ..analysis.settings import AnalysisSettings
from ..analysis.store import ResultStore, atomic_write_bytes, atomic_write_text
from ..errors import HesdFileNotFoundError
from .report_template import render_report

__all__ = ["SeriesData", "build_report", "find_series", "load_series", "run_name"]

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


def load_series(root: str | Path, label: str | None = None) -> SeriesData:
    """Load one results folder without recomputing anything."""
    store = ResultStore.open_existing(root)
    stored = store.settings
    analysis = dict(stored.get("analysis", stored))
    settings = AnalysisSettings(**analysis)
    rows = sorted(store.rows(), key=series_order)
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
    n = 4 + int(has_acc)  # Ct, re/KH05, eigenvalues, [held-out accuracy], losses
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
    ax.legend(fontsize=7, loc="best", ncol=3)
    ax = axes[1]
    ax.plot(x, t["re"], "o-", label="re")
    ax.plot(x, t["kh05"], "s-", label="KH05")
    ax.set_ylabel("criterion")
    ax.legend(fontsize=7, loc="best")
    ax = axes[2]
    ax.plot(x, t["lambda_max"], "o-", color="tab:blue", label="λmax")
    ax.plot(x, t["lambda_min"], "o-", color="tab:red", label="λmin")
    ax.set_yscale("symlog", linthresh=max(1e-3, float(np.nanmax(np.abs(t["lambda_min"]))) / 10))
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel("eigenvalue")
    ax.legend(fontsize=7, loc="best")
    if has_acc:
        ax = axes[3]
        ax.plot(x, t["heldout_accuracy"], "o-", color="tab:purple", label="held-out accuracy")
        ax.set_ylabel("held-out acc.")
    ax = axes[-1]  # the losses: the training loss always, the held-out loss where recorded
    ax.plot(x, t["train_loss"], "s--", color="tab:gray", label="train loss")
    if has_loss:
        ax.plot(x, t["heldout_loss"], "o-", color="tab:purple", label="held-out loss")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7, loc="best")
    drawn: dict[float, int] = {}  # picks already drawn at an x: a later one is drawn thinner on top, dashed
    handles = []
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
        k = drawn.get(xe, 0)
        drawn[xe] = k + 1
        style = {"color": color, "lw": 3.0 - 0.9 * k, "alpha": 0.65, "ls": ("-", (0, (4, 2)), (0, (1, 1.5)))[min(k, 2)]}
        for a in axes:
            line = a.axvline(xe, **style)
        handles.append((line, f"{label}: {series_unit(t)} {sel.get('epoch')}"))
    axes[-1].set_xlabel(series_unit(t))
    if handles:  # below the panels, where it covers no point
        fig.legend([h for h, _ in handles], [lab for _, lab in handles], loc="lower center", ncol=len(handles),
                   fontsize=7, frameon=False)  # fmt: skip
    axes[0].set_title(f"{series.label}: criteria over training")
    fig.tight_layout(rect=(0, 0.03 if handles else 0, 1, 1))
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
        fig.colorbar(cs, ax=ax).set_label("loss")
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


def _fmt(v: Any) -> str:
    """A table cell's text (escaping is the template's)."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


_LEFT = ("name", "error")
_TYPE_CLASSES = ("MP", "MN", "undetermined")  # a class name only from the known values


def _cell(r: pd.Series, c: str) -> dict[str, str]:
    """One results cell: its text, its CSS class and its tooltip."""
    cls = "l" if c in _LEFT else ""
    text, tip = _fmt(r[c]), ""
    if c == "hesd_type" and r[c] in _TYPE_CLASSES:
        cls += f" {r[c]}"
        tip = str(r.get("type_reason") or "")
    if c == "trace":  # an SLQ trace with few probes is noisy: never bare
        text = trace_text(r[c], r.get("trace_se")) or text
    if c == "qs_flag" and bool(r[c]):
        tip = str(r.get("qs_reason") or "")
    return {"text": text, "cls": cls.strip(), "tip": tip}


def _table(t: pd.DataFrame) -> dict[str, Any]:
    cols = [c for c in VIEWS["report"] if c in t and c != "trace_se"]
    head = [{"text": "trace ± se" if c == "trace" else c, "cls": "l" if c in _LEFT else ""} for c in cols]
    rows = [{"failed": r.get("status") != "ok", "cells": [_cell(r, c) for c in cols]} for _, r in t.iterrows()]
    return {"head": head, "rows": rows}


def _flat(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    """A nested manifest as ``(dotted key, value)`` rows for the settings table."""
    if isinstance(d, dict) and d:
        return [kv for k, v in d.items() for kv in _flat(v, f"{prefix}{k}.")]
    if isinstance(d, list) and all(isinstance(x, (str, int, float)) for x in d):
        return [(prefix.rstrip("."), ", ".join(map(str, d)))]
    return [(prefix.rstrip("."), d if isinstance(d, str) else json.dumps(d))]


def _settings_view(manifest: dict) -> dict:
    """The manifest with its settings at the top level (``analysis.num_steps``, not ``settings.analysis...``)."""
    return {**{k: v for k, v in manifest.items() if k != "settings"}, **manifest.get("settings", {})}


def run_name(table: pd.DataFrame, root: Path) -> str:
    """The name of the run a series comes from: its checkpoints' common folder, else the results folder's name.

    ``runs/lr0.1/epoch_3.pt`` → ``lr0.1``; Trainer folders ``out/checkpoint-200`` → ``out``;
    rows without a file (:class:`hesd.Monitor`) → the results folder's name.
    """
    paths = [Path(str(c)) for c in table.get("checkpoint", []) if not str(c).startswith("monitor:")]
    if paths:
        try:
            common = Path(os.path.commonpath([str(p.parent) for p in paths]))
        except ValueError:  # paths on different drives
            common = None
        if common is not None and common.name:
            return common.name
    return root.name


def _versions() -> dict[str, str]:
    import matplotlib as mpl
    import scipy
    import torch

    return {"hesd": __version__, "torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "pandas": pd.__version__, "matplotlib": mpl.__version__, "python": platform.python_version(),
            "platform": platform.platform()}  # fmt: skip


def build_report(root: str | Path, out: str | Path | None = None, title: str = "hesd report") -> Path:
    """Build ``report.html`` (and ``figures/*.png|svg``, ``results.csv|json`` per series) from stored results.

    The page is rendered by a Jinja2 template with autoescaping
    (:mod:`hesd.interfaces.report_template`): every stored value reaches it as text, so markup
    in a shared folder's names, reasons or settings is shown, never run.

    Args:
        root: a results folder, or a folder of results folders (one per training run).
        out: where to write the HTML (default ``root/report.html``).
        title: page title.

    Returns:
        The path of the HTML file.
    """
    root = Path(root)
    series = [load_series(p) for p in find_series(root)]
    names = [run_name(s.table, s.root) for s in series]
    for s, name in zip(series, names, strict=True):  # the run's name; the results folder's where two runs share it
        s.label = name if names.count(name) == 1 or s.root.name == name else f"{name} ({s.root.name})"
    out = Path(out) if out else root / "report.html"
    figdir = out.parent / "figures"
    context: dict[str, Any] = {"title": title, "generated": time.strftime("%Y-%m-%d %H:%M"), "version": __version__,
                               "root": str(root), "series": [], "versions": _versions()}  # fmt: skip
    for s in series:
        t = s.table
        ok = t[t["status"] == "ok"]
        unit = series_unit(t)
        picks_short = []
        for rule in ("highest_ct_mp", "smallest_lambda_max"):
            sel = s.selections.get(rule, {})
            txt = f"{unit} {sel['epoch']}" if sel.get("checkpoint") else "none"
            if sel.get("heldout_accuracy") is not None:
                txt += f" (held-out acc. {sel['heldout_accuracy']:.3f})"
            elif sel.get("heldout_loss") is not None:
                txt += f" (held-out loss {sel['heldout_loss']:.3f})"
            picks_short.append(txt)
        slug = "".join(ch if ch.isalnum() else "_" for ch in s.root.name) or "series"  # unique within one report
        imgs = [("density", _fig_density(s)), ("criteria", _fig_criteria(s))] if len(ok) else []
        if s.landscape and len(ok):
            imgs.append(("landscape", _fig_landscape(s)))
        decision = decide(t, s.selections, unit)
        picks = [{"title": _RULE_STYLE.get(r, (r,))[0],
                  "grade": decision.grades.get(r, "good" if r == "best_heldout" else "unknown"),
                  "checkpoint": Path(v["checkpoint"]).name if v.get("checkpoint") else None,
                  "reason": v["reason"] + ("" if r == "best_heldout" or not gap_text(v) else "; " + gap_text(v)),
                  "flags": decision.flags.get(r, []), "reliability": reliability_text(r, with_scope=False)}
                 for r, v in s.selections.items()]  # fmt: skip
        context["series"].append({
            "label": s.label, "decision": decision, "picks": picks, "table": _table(t),
            "figures": [{"name": n, "src": _save(fig, figdir, f"{slug}_{n}")} for n, fig in imgs],
            "csv": str(s.root / "results.csv"), "settings": _flat(_settings_view(s.manifest)),
            "counts": {"checkpoints": len(t), "MP": int((ok["hesd_type"] == "MP").sum()),
                       "MN": int((ok["hesd_type"] == "MN").sum()),
                       "undetermined": int((ok["hesd_type"] == "undetermined").sum()),
                       "qs": int(ok["qs_flag"].sum()), "failed": int((t["status"] != "ok").sum())},
            "picks_short": picks_short,
        })  # fmt: skip
        ResultStore.open_existing(s.root).write_tables(records(t))  # the tables follow the rebuilt flags
    context["multi"] = len(series) > 1
    context["study"] = study_note()
    atomic_write_text(out, render_report(context))
    return out
