"""Seeded probe vectors, identical on every device and dtype."""

from __future__ import annotations

import torch

__all__ = ["gaussian", "rademacher"]


def rademacher(n: int, k: int, seed: int, dtype: torch.dtype, device: torch.device, offset: int = 0) -> torch.Tensor:
    """``(n, k)`` Rademacher (±1) probes, identical for a given ``seed`` on every device and dtype.

    Column ``j`` is drawn from generator state ``seed`` advanced by ``offset + j`` probes,
    so chunked and unchunked draws agree.
    """
    out = torch.empty(n, k, dtype=dtype, device=device)
    for j in range(k):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + offset + j)
        out[:, j] = (torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1).to(dtype)
    return out


def gaussian(n: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A seeded standard normal vector, the same on every device."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
