"""A small, honest training loop that writes checkpoints, for the demo, tests and experiments.

Checkpoints are plain state dicts saved as ``epoch_NNN.pt`` (loadable with
``torch.load(weights_only=True)``), written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .errors import HesdValueError

__all__ = ["TrainConfig", "evaluate", "make_optimizer", "train_with_checkpoints"]


@dataclass
class TrainConfig:
    """Settings of :func:`train_with_checkpoints`.

    Attributes:
        epochs: number of epochs.
        lr: learning rate.
        optimizer: ``"sgd"``, ``"momentum"`` (SGD, momentum 0.9), ``"adam"``, ``"adamw"`` or
            ``"adahessian"`` (from the ``pytorch-optimizer`` package).
        batch_size: mini-batch size.
        clip: clip the gradient norm to this value after each backward (external
            gradient manipulation, as studied in the paper), or ``None``.
        weight_decay: weight decay.
        seed: seed of the data order.
        save_every: checkpoint every this many epochs (epoch 0 is the initialisation).
    """

    epochs: int = 10
    lr: float = 0.05
    optimizer: str = "momentum"
    batch_size: int = 64
    clip: float | None = None
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 1
    extra: dict = field(default_factory=dict)


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Build an optimiser by name (AdaHessian comes from ``pytorch-optimizer``)."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay or 1e-2)
    if name == "adahessian":
        try:
            from pytorch_optimizer import AdaHessian
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "make_optimizer: 'adahessian' needs the pytorch-optimizer package: pip install pytorch-optimizer"
            ) from exc
        return AdaHessian(params, lr=lr, weight_decay=weight_decay)
    raise HesdValueError(f"make_optimizer: unknown optimizer {name!r}; use sgd, momentum, adam, adamw or adahessian")


@torch.no_grad()
def evaluate(model: nn.Module, data, loss_fn: Callable = nn.functional.cross_entropy) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` (in eval mode) over ``(inputs, targets)`` batches."""
    was = model.training
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    for X, y in data:
        out = model(X)
        loss_sum += float(loss_fn(out, y)) * len(y)
        correct += int((out.argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_with_checkpoints(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    out_dir: str | Path,
    config: TrainConfig,
    loss_fn: Callable = nn.functional.cross_entropy,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
) -> list[Path]:
    """Train ``model`` on ``(X, y)`` and save ``epoch_NNN.pt`` every ``save_every`` epochs.

    Returns the checkpoint paths, epoch 0 (initialisation) first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(TensorDataset(X, y), batch_size=config.batch_size, shuffle=True, generator=g)
    opt = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay)
    second_order = config.optimizer == "adahessian"
    paths = []
    path = out / "epoch_000.pt"
    _save_atomic(model.state_dict(), path)
    paths.append(path)
    for epoch in range(1, config.epochs + 1):
        model.train()
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward(create_graph=second_order)
            if config.clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch, model)
        if epoch % config.save_every == 0 or epoch == config.epochs:
            path = out / f"epoch_{epoch:03d}.pt"
            _save_atomic(model.state_dict(), path)
            paths.append(path)
    return paths
