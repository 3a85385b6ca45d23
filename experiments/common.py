"""Shared machinery of the reproduction experiments (arXiv 2504.17618 with hesd).

One *configuration* = model × data variant × optimiser (× clipping / AdaHessian averaging)
× seed. :func:`run_config` trains it with checkpoints, analyses the series with hesd's
own store (resumable) and returns hesd's results table and selections. Everything is
offline: scikit-learn's digits, optionally with label noise, standardisation or augmentation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

import hesd
from hesd.models import DigitsCNN, DigitsMLP, ResNet20, TinyViT, load_digits_tensors
from hesd.training import make_optimizer

ROOT = Path(__file__).resolve().parent
CE = nn.functional.cross_entropy
MODELS = {
    "mlp": lambda: DigitsMLP(),
    "cnn": lambda: DigitsCNN(),
    "resnet": lambda: ResNet20(num_classes=10, in_channels=1, width=8),
    "vit": lambda: TinyViT(),
}


@dataclass
class Config:
    """One training run."""

    model: str = "mlp"
    optimizer: str = "momentum"  # sgd, momentum, adam, adamw, adahessian
    lr: float = 0.05
    epochs: int = 20
    batch_size: int = 64
    clip: float | None = None  # gradient-norm clipping threshold
    block: int = 1  # AdaHessian: average the Hessian diagonal over blocks of this size (1 = none)
    data: str = "raw"  # raw, standardized, augmented
    label_noise: float = 0.0
    seed: int = 0
    save_every: int = 2
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        parts = [self.model, self.optimizer, f"lr{self.lr:g}", self.data]
        if self.clip is not None:
            parts.append(f"clip{self.clip:g}")
        if self.optimizer == "adahessian":
            parts.append(f"block{self.block}")
        if self.label_noise:
            parts.append(f"noise{self.label_noise:g}")
        parts.append(f"e{self.epochs}")
        parts.append(f"s{self.seed}")
        return "_".join(parts)


def data_for(cfg: Config):
    X, y, Xh, yh = load_digits_tensors(seed=0, label_noise=cfg.label_noise)
    if cfg.data == "standardized":
        mu, sd = X.mean(), X.std()
        X, Xh = (X - mu) / sd, (Xh - mu) / sd
    return X, y, Xh, yh


def _augment(xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random ±1-pixel shifts and Gaussian noise (training batches only)."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
    return xb + 0.05 * torch.randn(xb.shape, generator=g)


def _averaged_hessian_diag(params, grads, block: int, g: torch.Generator) -> list[torch.Tensor]:
    """Hutchinson estimate of diag(H) with AdaHessian-style averaging.

    Convolution kernels are averaged over their spatial dimensions (Yao et al. 2021); with
    ``block > 1`` every weight matrix is also averaged over contiguous blocks of ``block``
    entries along its last dimension (the transformer variant's block averaging). This
    averaging happens outside the loss: the optimiser then preconditions with a diagonal
    that is not the Hessian's.
    """
    zs = [torch.randint(0, 2, p.shape, generator=g).to(p.dtype) * 2 - 1 for p in params]
    hz = torch.autograd.grad(grads, params, grad_outputs=zs, retain_graph=False)
    out = []
    for p, h, z in zip(params, hz, zs, strict=True):
        d = (h * z).abs()
        if p.ndim == 4 and block > 1:
            d = d.mean(dim=(2, 3), keepdim=True).expand_as(d)
        if p.ndim >= 2 and block > 1:
            flat = d.reshape(-1, d.shape[-1])
            n = flat.shape[-1]
            pad = (-n) % block
            padded = torch.cat([flat, flat[:, -1:].expand(-1, pad)], dim=1) if pad else flat
            means = padded.reshape(flat.shape[0], -1, block).mean(dim=2, keepdim=True)
            d = means.expand(-1, -1, block).reshape(flat.shape[0], -1)[:, :n].reshape(d.shape)
        out.append(d.contiguous())
    return out


def train(cfg: Config, ckpt_dir: Path) -> None:
    """Train with checkpoints every ``save_every`` epochs (epoch 0 = initialisation)."""
    if (ckpt_dir / "DONE").exists():
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = MODELS[cfg.model]()
    X, y, _, _ = data_for(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(TensorDataset(X, y), batch_size=cfg.batch_size, shuffle=True, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg.optimizer, params, cfg.lr)
    torch.save(model.state_dict(), ckpt_dir / "epoch_000.pt")
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for xb, yb in loader:
            if cfg.data == "augmented":
                xb = _augment(xb, g)
            if cfg.optimizer == "adahessian":  # fused CPU attention has no second derivative: math kernel
                with sdpa_kernel(SDPBackend.MATH):
                    loss = CE(model(xb), yb)
            else:
                loss = CE(model(xb), yb)
            if cfg.optimizer == "adahessian":
                with sdpa_kernel(SDPBackend.MATH):
                    grads = torch.autograd.grad(loss, params, create_graph=True)
                for p, gr in zip(params, grads, strict=True):
                    p.grad = gr.detach().clone()
                if cfg.clip is not None:
                    nn.utils.clip_grad_norm_(params, cfg.clip)
                with sdpa_kernel(SDPBackend.MATH):
                    diag = _averaged_hessian_diag(params, grads, cfg.block, g)
                opt.step(hessian=diag)
            else:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip is not None:
                    nn.utils.clip_grad_norm_(params, cfg.clip)
                opt.step()
            opt.zero_grad(set_to_none=True)
        if not all(torch.isfinite(p).all() for p in params):
            break  # diverged: keep the checkpoints so far; later ones would be NaN
        if epoch % cfg.save_every == 0 or epoch == cfg.epochs:
            tmp = ckpt_dir / f".epoch_{epoch:03d}.pt.tmp"
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, ckpt_dir / f"epoch_{epoch:03d}.pt")
    (ckpt_dir / "DONE").write_text("ok")


def analyse(cfg: Config, ckpt_dir: Path, res_dir: Path, steps: int, probes: int) -> hesd.SeriesResult:
    X, y, Xh, yh = data_for(cfg)
    settings = hesd.AnalysisSettings(num_steps=steps, num_probes=probes, seed=0, lr=cfg.lr, refine_extremes=False)
    return hesd.analyze_checkpoints(MODELS[cfg.model], ckpt_dir, (X, y), heldout=(Xh, yh), out_dir=res_dir,
                                    settings=settings)  # fmt: skip


def run_config(cfg: Config, out: Path, steps: int, probes: int) -> pd.DataFrame:
    """Train and analyse one configuration; return hesd's table with the configuration's fields."""
    ckpt_dir = out / "checkpoints" / cfg.name
    res_dir = out / "results" / cfg.name
    train(cfg, ckpt_dir)
    res = analyse(cfg, ckpt_dir, res_dir, steps, probes)
    t = res.table.copy()
    for k, v in asdict(cfg).items():
        if k != "extra":
            t[k] = v if not isinstance(v, float) or not math.isnan(v) else None
    t["config"] = cfg.name
    (res_dir / "config.json").write_text(json.dumps(asdict(cfg)))
    return t


def summarise(tables: list[pd.DataFrame], by: list[str], threshold: float = -0.6) -> pd.DataFrame:
    """Per group: Ct mean ± std over trained checkpoints and seeds, MP/MN counts, final accuracy."""
    t = pd.concat(tables, ignore_index=True)
    t = t[(t["status"] == "ok") & (t["epoch"] > 0)]
    rows = []
    for key, g in t.groupby(by, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        final = g[g["epoch"] == g.groupby("config")["epoch"].transform("max")]
        rows.append({**dict(zip(by, key, strict=True)), "seeds": g["seed"].nunique(), "checkpoints": len(g),
                     "MP": int((g["ct"] > threshold).sum()), "MN": int((g["ct"] <= threshold).sum()),
                     "ct_mean": g["ct"].mean(), "ct_std": g["ct"].std(), "ct_min": g["ct"].min(),
                     "final_acc_mean": final["heldout_accuracy"].mean(),
                     "final_acc_std": final["heldout_accuracy"].std()})  # fmt: skip
    return pd.DataFrame(rows)


def run_configs(doc: str, configs, default_seeds: int) -> tuple[argparse.Namespace, list[Config], list, float]:
    """Parse the common options, then train and analyse every configuration of ``configs(quick, seeds)``."""
    args = parser(doc).parse_args()
    t0 = time.perf_counter()
    seeds = args.seeds or (1 if args.quick else default_seeds)
    steps, probes = (15, 1) if args.quick else (40, 2)
    cfgs = configs(args.quick, seeds)
    return args, cfgs, [run_config(c, args.out, steps, probes) for c in cfgs], t0


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="minutes: CI smoke (few epochs, one seed)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs", help="where checkpoints and results go")
    ap.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    return ap


def save_table(df: pd.DataFrame, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.csv"
    df.to_csv(path, index=False)
    return path


def fmt_pm(mean: float, std: float, digits: int = 3) -> str:
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def elapsed(t0: float) -> str:
    return f"{time.perf_counter() - t0:.0f} s"


__all__ = ["MODELS", "Config", "analyse", "data_for", "parser", "run_config", "run_configs", "save_table", "summarise"]
