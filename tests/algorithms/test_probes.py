"""Seeded probes: Rademacher signs from random bytes, the same for any dtype, chunking and layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hesd.algorithms.probes import rademacher

CPU = torch.device("cpu")


def _reference(n: int, seed: int, j: int) -> np.ndarray:
    """Column ``j``, written out with NumPy: the bits of ⌈n/8⌉ random bytes, least significant first, 1 → +1."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + j)
    data = torch.randint(0, 256, (-(-n // 8),), generator=g, dtype=torch.uint8).numpy()
    return 2.0 * np.unpackbits(data, bitorder="little")[:n] - 1.0


@pytest.mark.parametrize("n", [1, 7, 8, 13, 1000, 4099])
def test_rademacher_columns_are_the_bits_of_seeded_random_bytes(n):
    Z = rademacher(n, 3, 5, torch.float64, CPU)
    assert Z.shape == (n, 3)
    for j in range(3):
        assert np.array_equal(Z[:, j].numpy(), _reference(n, 5, j)), (n, j)


def test_rademacher_is_the_same_for_any_dtype_chunking_and_offset():
    n = 10_007
    whole = rademacher(n, 5, 2, torch.float64, CPU)
    parts = torch.cat([rademacher(n, 2, 2, torch.float64, CPU), rademacher(n, 3, 2, torch.float64, CPU, offset=2)], 1)
    assert torch.equal(whole, parts)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(rademacher(n, 5, 2, dtype, CPU).double(), whole), dtype
    assert not torch.equal(whole, rademacher(n, 5, 3, torch.float64, CPU))  # another seed, other probes
    assert not torch.equal(whole[:, 0], whole[:, 1])


def test_rademacher_signs_are_balanced_and_columns_contiguous():
    n = 1 << 20
    Z = rademacher(n, 4, 0, torch.float32, CPU)
    assert set(Z.unique().tolist()) == {-1.0, 1.0}
    assert float(Z.double().mean(0).abs().max()) < 4 / n**0.5  # ±1 with probability 1/2: sd 1/√n
    assert float((Z[1:] == Z[:-1]).double().mean()) == pytest.approx(0.5, abs=4 / n**0.5)  # neighbours independent
    assert Z.T.is_contiguous()  # each probe one vector, as operators take them
