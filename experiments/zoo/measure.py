"""Every candidate measure of every checkpoint of one run: hesd's analysis plus the protocol's baselines.

The Hessian measures come from :func:`hesd.analyze_checkpoints` (its own resumable store, one
folder per run): λmax, λmin, trace, Ct, re, KH05, the negative spectral mass, spectral width,
η·λmax/2, and with ``heldout_criteria`` the same criteria on held-out data and their
differences. The baselines are computed here, per checkpoint, and written atomically to
``baselines.json`` beside hesd's results: training accuracy and loss (on the labels trained on),
the parameter norm, the distance from initialisation, and a random-direction sharpness — the
mean loss increase under Gaussian perturbations scaled to each parameter's magnitude
(:math:`\\theta + \\sigma\\,|\\theta|\\odot z`, σ = 0.05, 8 draws, the same draws everywhere).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from space import RunConfig
from torch import nn
from train import make_model, task_data

import hesd
from hesd.analysis.checkpoints import load_state_dict
from hesd.analysis.store import atomic_write_text

SIGMA, DRAWS = 0.05, 8


def _loss_acc(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(X)
        return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def baselines(model: nn.Module, init: dict, X: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Training loss and accuracy, parameter norm, distance from initialisation, random sharpness."""
    model.eval()
    loss, acc = _loss_acc(model, X, y)
    params = dict(model.named_parameters())
    flat = torch.cat([p.detach().flatten() for p in params.values()])
    dist = torch.cat([(p.detach() - init[n]).flatten() for n, p in params.items()])
    g = torch.Generator().manual_seed(0)
    saved = {n: p.detach().clone() for n, p in params.items()}
    rises = []
    with torch.no_grad():
        for _ in range(DRAWS):
            for n, p in params.items():
                p.add_(SIGMA * saved[n].abs() * torch.randn(p.shape, generator=g))
            rises.append(_loss_acc(model, X, y)[0] - loss)
            for n, p in params.items():
                p.copy_(saved[n])
    return {
        "train_loss_full": loss,
        "train_accuracy": acc,
        "param_norm": float(flat.norm()),
        "dist_init": float(dist.norm()),
        "sharpness_random": sum(rises) / len(rises),
    }


def measure(run: RunConfig, ckpt_dir: Path, res_dir: Path, steps: int, probes: int) -> pd.DataFrame:
    """The run's table: one row per checkpoint, hesd's columns and the baselines (both resumable)."""
    X, y, Xh, yh = task_data(run.task, run.label_noise)
    batches = [(X[i : i + 512], y[i : i + 512]) for i in range(0, len(y), 512)]
    settings = hesd.AnalysisSettings(
        num_steps=steps,
        num_probes=probes,
        seed=0,
        lr=run.learning_rate,
        refine_extremes=False,
        heldout_criteria=True,
        sharpness_draws=0,  # the baselines below, computed here
    )
    res = hesd.analyze_checkpoints(
        lambda: make_model(run), ckpt_dir, batches, heldout=(Xh, yh), out_dir=res_dir, settings=settings
    )
    side = res_dir / "baselines.json"
    done = json.loads(side.read_text()) if side.exists() else {}
    init = load_state_dict(ckpt_dir / "epoch_000.pt")
    model = make_model(run)
    for path in sorted(ckpt_dir.glob("epoch_*.pt")):
        if path.name not in done:
            model.load_state_dict(load_state_dict(path))
            done[path.name] = baselines(model, init, X, y)
            atomic_write_text(side, json.dumps(done))
    t = res.table.copy()
    extra = pd.DataFrame.from_dict(done, orient="index").rename_axis("name").reset_index()
    t = t.drop(columns=[c for c in extra.columns if c in t.columns and c != "name"]).merge(extra, on="name")
    for k, v in run.to_dict().items():
        t[f"cfg_{k}"] = v
    return t
