"""Train one zoo network with checkpoints along training (resumable: a finished run is not retrained)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from space import RunConfig
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hesd.models import load_digits_tensors

CHECKPOINTS = (2, 5, 10, 15, 20)  # epochs saved (and 0, the initialisation); a quick run saves every epoch


def task_data(task: str, label_noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X, y, X_heldout, y_heldout)``: the digits (flattened), or a seeded synthetic 4-class problem."""
    if task == "digits":
        X, y, Xh, yh = load_digits_tensors(seed=0, label_noise=label_noise)
        return X.flatten(1), y, Xh.flatten(1), yh
    from sklearn.datasets import make_classification

    Xa, ya = make_classification(
        n_samples=2000,
        n_features=20,
        n_informative=10,
        n_redundant=4,
        n_classes=4,
        n_clusters_per_class=2,
        class_sep=1.0,
        flip_y=0.0,
        random_state=0,
    )
    X = torch.as_tensor(Xa, dtype=torch.float32)
    y = torch.as_tensor(ya, dtype=torch.long)
    mu, sd = X[:1500].mean(0), X[:1500].std(0)
    X = (X - mu) / sd
    y_train = y[:1500].clone()
    if label_noise > 0:
        g = torch.Generator().manual_seed(1)
        flip = torch.rand(1500, generator=g) < label_noise
        y_train[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=g)
    return X[:1500], y_train, X[1500:], y[1500:]


class ZooMLP(nn.Sequential):
    """GELU MLP: ``depth`` hidden layers of ``width``, dropout after each (training only)."""

    def __init__(self, inputs: int, classes: int, width: int, depth: int, dropout: float) -> None:
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(inputs if i == 0 else width, width), nn.GELU(), nn.Dropout(dropout)]
        super().__init__(*layers, nn.Linear(width, classes))


def make_model(run: RunConfig) -> ZooMLP:
    inputs, classes = (64, 10) if run.task == "digits" else (20, 4)
    return ZooMLP(inputs, classes, run.width, run.depth, run.dropout)


def _augment(task: str, xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if task == "digits":  # ±1-pixel shifts of the 8×8 image, and noise
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
        xb = torch.roll(xb.view(-1, 8, 8), shifts=(dx, dy), dims=(1, 2)).reshape(-1, 64)
        return xb + 0.05 * torch.randn(xb.shape, generator=g)
    return xb + 0.1 * torch.randn(xb.shape, generator=g)


def train(run: RunConfig, ckpt_dir: Path) -> None:
    """Train ``run``, saving ``epoch_XXX.pt`` at :data:`CHECKPOINTS` (every epoch for short runs); resumable."""
    if (ckpt_dir / "DONE").exists():
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1000 * run.seed + run.base)
    model = make_model(run)
    X, y, _, _ = task_data(run.task, run.label_noise)
    g = torch.Generator().manual_seed(run.seed)
    loader = DataLoader(TensorDataset(X, y), batch_size=run.batch_size, shuffle=True, generator=g)
    if run.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(
            model.parameters(), run.learning_rate, weight_decay=run.weight_decay
        )
    else:
        opt = torch.optim.SGD(model.parameters(), run.learning_rate, momentum=0.9, weight_decay=run.weight_decay)
    saves = set(CHECKPOINTS) if run.epochs >= max(CHECKPOINTS) else set(range(1, run.epochs + 1))
    torch.save(model.state_dict(), ckpt_dir / "epoch_000.pt")
    for epoch in range(1, run.epochs + 1):
        model.train()
        for xb, yb in loader:
            if run.augment:
                xb = _augment(run.task, xb, g)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), yb).backward()
            if run.clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), run.clip)
            opt.step()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            break  # diverged: the checkpoints so far stay, later ones would be NaN
        if epoch in saves:
            tmp = ckpt_dir / f".epoch_{epoch:03d}.pt.tmp"
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, ckpt_dir / f"epoch_{epoch:03d}.pt")
    (ckpt_dir / "DONE").write_text("ok")
