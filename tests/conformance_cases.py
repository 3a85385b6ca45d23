"""The conformance case matrix: one small float64 model per family of layers users train, each with
its loss and unequal batches of fresh random data (tests/operators/test_conformance.py).

A case builds ``(model, loss_fn, batches, model_mode)``. Batches are unequal (the last one
smaller) so that the weighting by item count is exercised everywhere. Parameter counts stay
under ~200, so that the dense Hessian and its central-difference check are cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Case:
    """A model family, its loss and its data."""

    name: str
    build: Callable[[torch.Generator], nn.Module]
    inputs: Callable[[torch.Generator, int], object]
    targets: Callable[[torch.Generator, int], torch.Tensor]
    loss: Callable
    model_mode: str = "eval"
    sizes: tuple[int, ...] = (6, 4, 3)


def _randn(*shape):
    return lambda g, n: torch.randn(n, *shape, generator=g, dtype=torch.float64)


def _classes(k):
    return lambda g, n: torch.randint(0, k, (n,), generator=g)


def _init(model: nn.Module, g: torch.Generator) -> nn.Module:
    """Fresh random parameters and running statistics (never zeros, never PyTorch's defaults alone)."""
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
    return model


class ConvGroupNorm(nn.Module):  # the regression model
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 5, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


class ConvBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.conv(x))).flatten(1))


class Conv3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 2)
        self.head = nn.Linear(2 * 2 * 2 * 2, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class Deconv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 1, 2, stride=2)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.up(x)).flatten(1))


class ConvInstanceNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.norm = nn.InstanceNorm2d(2, affine=True)
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


class LayerNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.gelu(self.norm(self.fc(x))))


class RMSNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.norm = nn.RMSNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return F.log_softmax(self.head(torch.tanh(self.norm(self.fc(x)))), dim=-1)


class EmbeddingBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        mask = (tokens != 0).unsqueeze(-1).to(self.emb.weight.dtype)
        pooled = (self.emb(tokens) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.head(torch.tanh(pooled))


class Attention(nn.Module):
    """nn.MultiheadAttention (SDPA inside) and a causal F.scaled_dot_product_attention."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.qkv = nn.Linear(4, 12)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.mha(x, x, x, need_weights=False)
        q, k, v = self.qkv(x + h).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), is_causal=True)
        return self.head(self.norm(x + a.squeeze(1)).mean(1))


class Recurrent(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[kind](3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TiedLM(nn.Module):
    """Embedding and output projection share one weight, as in GPT-2."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 6, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.emb(tokens))))


def _token_ce(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class FrozenAndUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 5)
        self.used = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.used(torch.tanh(self.frozen(x)))


CASES: list[Case] = [
    Case(
        "mlp_mse",
        lambda g: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)),
        _randn(3),
        _randn(2),
        F.mse_loss,
    ),
    Case("conv1d_groupnorm_mse", lambda g: ConvGroupNorm(), _randn(2, 5), _randn(1), F.mse_loss),
    Case("conv2d_batchnorm_eval_ce", lambda g: ConvBatchNorm(), _randn(1, 4, 4), _classes(3), F.cross_entropy),
    Case(
        "conv2d_batchnorm_train_ce",
        lambda g: ConvBatchNorm(),
        _randn(1, 4, 4),
        _classes(3),
        F.cross_entropy,
        model_mode="train",
    ),
    Case("conv3d_ce", lambda g: Conv3d(), _randn(1, 3, 3, 3), _classes(3), F.cross_entropy),
    Case("convtranspose2d_huber", lambda g: Deconv(), _randn(2, 2, 2), _randn(2), F.huber_loss),
    Case("instancenorm_ce", lambda g: ConvInstanceNorm(), _randn(1, 4, 4), _classes(3), F.cross_entropy),
    Case(
        "layernorm_label_smoothing",
        lambda g: LayerNormMLP(),
        _randn(5),
        _classes(3),
        lambda o, y: F.cross_entropy(o, y, label_smoothing=0.1),
    ),
    Case("rmsnorm_nll", lambda g: RMSNormMLP(), _randn(5), _classes(3), F.nll_loss),
    Case(
        "embedding_padding_ce",
        lambda g: EmbeddingBag(),
        lambda g, n: torch.randint(0, 7, (n, 5), generator=g),
        _classes(3),
        F.cross_entropy,
    ),
    Case("attention_sdpa_ce", lambda g: Attention(), _randn(3, 4), _classes(3), F.cross_entropy),
    Case("gru_ce", lambda g: Recurrent("gru"), _randn(4, 3), _classes(2), F.cross_entropy),
    Case(
        "lstm_bce",
        lambda g: Recurrent("lstm"),
        _randn(4, 3),
        lambda g, n: torch.rand(n, 2, generator=g, dtype=torch.float64),
        F.binary_cross_entropy_with_logits,
    ),
    Case(
        "tied_embedding_lm",
        lambda g: TiedLM(),
        lambda g, n: torch.randint(0, 6, (n, 3), generator=g),
        lambda g, n: torch.randint(0, 6, (n, 3), generator=g),
        _token_ce,
    ),
    Case("frozen_and_unused_ce", lambda g: FrozenAndUnused(), _randn(4), _classes(3), F.cross_entropy),
]


def build(case: Case, seed: int = 0):
    """``(model, batches)`` of ``case``: a float64 model with fresh random parameters and unequal batches."""
    g = torch.Generator().manual_seed(seed)
    model = _init(case.build(g), g)
    batches = [(case.inputs(g, n), case.targets(g, n)) for n in case.sizes]
    return model, batches
