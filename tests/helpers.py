"""Shared test helpers: tiny float64 models and fresh random data with a smaller last batch."""

from __future__ import annotations

import torch
from torch import nn

torch.set_num_threads(2)


class TanhMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return self.net(x)


class BNCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(self.norm(x + h).mean(dim=1))


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.used(x))


class WithFrozen(TanhMLP):
    def __init__(self) -> None:
        super().__init__()
        for p in self.net[0].parameters():
            p.requires_grad_(False)


def _init_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64))


INPUT_SHAPES = {
    "mlp": (4,),
    "cnn": (1, 4, 4),
    "attention": (5, 4),
    "unused": (4,),
    "frozen": (4,),
}
FACTORIES = {"mlp": TanhMLP, "cnn": BNCNN, "attention": Attention, "unused": WithUnused, "frozen": WithFrozen}


def make_case(name: str, seed: int = 0, n: int = 21, batch: int = 8):
    """A float64 model, its batches (last one smaller) and the whole data set."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FACTORIES[name]().double()
    _init_bn(model, gen)
    X = torch.randn(n, *INPUT_SHAPES[name], generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    batches = [(X[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    return model, batches, (X, y)


def random_symmetric(n: int, eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A dense symmetric matrix with the given eigenvalues and a random orthonormal basis."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * eigs.to(torch.float64)) @ Q.T


def make_series(folder, checkpoints: int):
    """``checkpoints`` random DigitsMLP files ``epoch_1.pt`` … in ``folder``, and 200 training / held-out samples."""
    from hesd.models import DigitsMLP, load_digits_tensors

    for e in range(checkpoints):
        torch.manual_seed(e)
        torch.save(DigitsMLP().state_dict(), folder / f"epoch_{e + 1}.pt")
    X, y, Xh, yh = load_digits_tensors()
    return folder, (X[:200], y[:200]), (Xh[:200], yh[:200])
