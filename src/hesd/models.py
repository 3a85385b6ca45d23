"""Small models and the embedded data set (scikit-learn's bundled ``load_digits``).

Used by ``hesd demo``, the tests, the benchmarks and the experiments; all offline.
Factories here follow the ``module:factory`` convention of ``hesd analyze``:
``hesd.models:digits_mlp`` and ``hesd.models:digits_train_data``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DigitsCNN",
    "DigitsMLP",
    "TinyViT",
    "digits_cnn",
    "digits_heldout_data",
    "digits_mlp",
    "digits_train_data",
    "digits_vit",
    "load_digits_tensors",
    "resnet20",
]


def load_digits_tensors(
    heldout_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32, label_noise: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1797 8×8 digit images as ``(X_train, y_train, X_heldout, y_heldout)``.

    Images are ``(N, 1, 8, 8)`` scaled to ``[0, 1]``; the split is stratified-free but
    seeded. ``label_noise`` replaces that fraction of *training* labels with random ones
    (to provoke overfitting in experiments).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.as_tensor(d.images, dtype=dtype).unsqueeze(1) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_hold = round(heldout_fraction * len(y))
    hold, train = perm[:n_hold], perm[n_hold:]
    y_train = y[train].clone()
    if label_noise > 0:
        flip = torch.rand(len(train), generator=g) < label_noise
        y_train[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    return X[train], y_train, X[hold], y[hold]


def digits_train_data(batch_size: int = 256) -> DataLoader:
    """Training split of the digits as a deterministic (unshuffled) DataLoader."""
    X, y, _, _ = load_digits_tensors()
    return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=False)


def digits_heldout_data(batch_size: int = 256) -> DataLoader:
    """Held-out split of the digits as a DataLoader."""
    _, _, X, y = load_digits_tensors()
    return DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=False)


class DigitsMLP(nn.Module):
    """A tanh MLP for 8×8 digits: 64 → hidden → hidden → 10."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.net(x)


class DigitsCNN(nn.Module):
    """A small CNN with BatchNorm for 8×8 digits."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1, stride=2),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * c * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.features(x).flatten(1))


class TinyViT(nn.Module):
    """A tiny vision transformer: 2×2 patches of the 8×8 image, pre-LayerNorm blocks, mean pooling."""

    def __init__(self, dim: int = 16, depth: int = 1, heads: int = 2, patch: int = 2, image: int = 8) -> None:
        super().__init__()
        self.patch = patch
        n = (image // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        p = self.patch
        b = x.shape[0]
        patches = x.unfold(2, p, p).unfold(3, p, p).reshape(b, -1, p * p)
        h = self.blocks(self.embed(patches) + self.pos)
        return self.head(self.norm(h).mean(dim=1))


def digits_mlp() -> nn.Module:
    """Factory for :class:`DigitsMLP` (seeded, so every call builds the same network)."""
    torch.manual_seed(0)
    return DigitsMLP()


def digits_cnn() -> nn.Module:
    """Factory for :class:`DigitsCNN`."""
    torch.manual_seed(0)
    return DigitsCNN()


def digits_vit() -> nn.Module:
    """Factory for :class:`TinyViT`."""
    torch.manual_seed(0)
    return TinyViT()


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet20(nn.Module):
    """ResNet-20 for 32×32 images (He et al. 2016, CIFAR variant), about 0.27 M parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        self.conv = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(w)
        layers: list[nn.Module] = []
        cin = w
        for cout, stride in ((w, 1), (2 * w, 2), (4 * w, 2)):
            for i in range(3):
                layers.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        out = self.layers(torch.relu(self.bn(self.conv(x))))
        return self.fc(out.mean(dim=(2, 3)))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Factory for a CIFAR-shaped ResNet-20 (seeded)."""
    torch.manual_seed(0)
    return ResNet20(num_classes, in_channels)
