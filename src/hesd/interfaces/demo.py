"""``hesd demo``: the embedded default job on scikit-learn's bundled digits.

Trains the small BatchNorm CNN twice — SGD with momentum, and the same with aggressive
gradient-norm clipping (external gradient manipulation, one of the paper's MN-HESD
causes) — writes checkpoints, analyses both series with the same probes, computes the
landscape of each pick and writes one HTML report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..algorithms.spectrum import Spectrum
from ..analysis.rows import VIEWS
from ..analysis.series import analyze_checkpoints
from ..analysis.settings import AnalysisSettings
from ..errors import HesdPermissionError
from ..models import digits_cnn, load_digits_tensors
from ..training import TrainConfig, train_with_checkpoints
from ._common import Progress, store_landscape
from .report import build_report

__all__ = ["DEMO_RUNS", "run_demo", "text_histogram"]

#: The two runs: name → training configuration (epochs filled in by ``run_demo``).
DEMO_RUNS: dict[str, dict[str, Any]] = {
    "sgd_momentum": {"optimizer": "momentum", "lr": 0.05, "clip": None},
    "clipped": {"optimizer": "momentum", "lr": 0.05, "clip": 0.01},
}


def text_histogram(spectrum: Spectrum, bins: int = 20, width: int = 46) -> str:
    """A text histogram of the smoothed density, log-scaled, from λmin to λmax."""
    t, d = spectrum.density(np.linspace(spectrum.lambda_min, spectrum.lambda_max, bins))
    logd = np.log10(np.maximum(d, 1e-12))
    lo = logd.min()
    span = max(logd.max() - lo, 1e-12)
    return "\n".join(
        f"{x:>10.4g} | " + "#" * max(1, round(width * (v - lo) / span)) for x, v in zip(t, logd, strict=True)
    )


def run_demo(out: str | Path = "hesd-demo", *, epochs: int = 16, quick: bool = False, quiet: bool = False) -> dict:
    """Run the demo; return the selections per run and the report path."""
    t0 = time.perf_counter()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HesdPermissionError(
            f"hesd demo: cannot create {out} ({exc.strerror}); pass --out to a writable folder"
        ) from None
    torch.set_num_threads(max(1, torch.get_num_threads()))
    X, y, Xh, yh = load_digits_tensors()
    settings = AnalysisSettings(
        num_steps=20 if quick else 50, num_probes=2 if quick else 3, seed=0, lr=0.05, refine_extremes=not quick
    )
    save_every = 1 if quick else 2
    result: dict = {"runs": {}}
    for name, run in DEMO_RUNS.items():
        ckpt_dir = out / "checkpoints" / name
        res_dir = out / "results" / name
        cfg = TrainConfig(epochs=epochs, lr=run["lr"], optimizer=run["optimizer"], clip=run["clip"],
                          save_every=save_every, batch_size=64)  # fmt: skip
        if not quiet:
            clip = f", gradient norm clipped to {run['clip']}" if run["clip"] else ""
            print(f"[{name}] training the digits CNN for {epochs} epochs (SGD, momentum 0.9, lr {run['lr']}{clip})")
        torch.manual_seed(0)
        train_with_checkpoints(digits_cnn(), X, y, ckpt_dir, cfg)
        progress = Progress(quiet, settings.num_steps * settings.num_probes)
        res = analyze_checkpoints(
            digits_cnn, ckpt_dir, (X, y), heldout=(Xh, yh), out_dir=res_dir, settings=settings, overwrite=True,
            progress=progress,
        )  # fmt: skip
        progress.close()
        store_landscape(res_dir, digits_cnn, (X, y), nn.functional.cross_entropy, res.selections,
                        seed=settings.seed)  # fmt: skip
        result["runs"][name] = res.selections
        if not quiet:
            t = res.table
            print(t[list(VIEWS["demo"])].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            for rule, sel in res.selections.items():
                pick = f"epoch {sel['epoch']}" if sel.get("checkpoint") else "no pick"
                print(f"  {rule}: {pick} — {sel['reason']}")
            print()
    report = build_report(out / "results", out / "report.html", title="hesd demo: digits CNN, SGD vs clipped SGD")
    result["report"] = str(report.resolve())
    result["seconds"] = time.perf_counter() - t0
    if not quiet:
        print(f"report: {report.resolve()}  ({result['seconds']:.0f} s)")
    return result
