r"""A Lanczos step's vector work in three compiled sweeps (float32 on the CPU, with Numba).

:class:`hesd.algorithms.basis.Basis` re-orthogonalises :math:`w = A q_j` by Gram-Schmidt twice,
the first pass against :math:`q_{j-1}, q_j` and the second against every stored vector
:math:`Q` (the whole basis, or a window of it). Written as PyTorch calls, each a sweep over
vectors of :math:`n` entries, a step reads and writes 19 vectors of a 3-vector window
(inner products, two subtractions, a norm, a division into the basis), and each inner product
is a loop of one BLAS call per chunk of :data:`~hesd.algorithms.inner.CHUNK` entries, issued
from Python (:mod:`hesd.algorithms.inner`: 7 553 calls for 124 M entries). Here the same
arithmetic is three compiled kernels, each one sweep over chunks of the same length:

1. :func:`products`: :math:`h = [q_{j-1}, q_j]^\top w` (the three-term coefficients,
   :math:`\alpha_j` last).
2. :func:`subtract_then_products`: :math:`w \leftarrow w - [q_{j-1}, q_j]\,h`, then
   :math:`h_2 = Q^\top w` and :math:`\|w\|^2` while the chunk is still in cache.
3. :func:`subtract_into`: :math:`q_{j+1} = (w - Q h_2)/\beta_j`, written straight into its slot
   of the basis (which may be the oldest vector's, read in the same sweep:
   each entry is read before it is written).

:math:`\beta_j^2 = \|w\|^2 - \|h_2\|^2` (Pythagoras, since :math:`Q` is orthonormal to rounding).
The second pass's coefficients are of rounding size (the first pass leaves :math:`w` orthogonal
to :math:`Q` to a relative :math:`\epsilon\|A\|/\beta_j`), so the subtraction loses nothing;
where :math:`\|h_2\|^2 > 10^{-2}\|w\|^2` the basis falls back to the explicit norm. That is 13
vector sweeps of a 3-vector window instead of 19, and no per-chunk dispatch: at 124 M entries on
two cores 0.3 s of vector work a step instead of 0.5 s (BENCHMARKS.md §9). The restarted loop of
:func:`hesd.eigenvalues` (``reorth="full"``) takes the same three sweeps over its basis, its first
pass over the whole basis where a thick restart coupled the new column to every kept Ritz vector.

Inner products are summed by blocks of 256 entries in float32 and the blocks in float64
(:mod:`hesd.algorithms.fused_kernels`), which is more accurate than a float32 sum over each chunk
(:func:`hesd.algorithms.inner.inner`): on a float32 diagonal operator with λmax = 30, windowed
Lanczos's largest Ritz value erred by 9.0e-7 (rms over 16 starts) against 1.6e-6 on the PyTorch
path. Every chunk is one thread's and writes its own row of partial sums, so the bits do not
depend on the number of threads (:func:`hesd.algorithms.inner.chunk_loop`, tested). Numba's
``reassoc`` and ``contract`` flags only: reductions vectorise and multiply-adds fuse, while NaN
and infinity keep their meaning (hesd's non-finite checks rely on them).

Numba is optional (``pip install 'hesd[fast]'``) and imported at first use (the kernels compile
once, 2.4 s on a 2-core machine, and load from Numba's cache in 0.3 s after). Without it, or with
``HESD_FUSED=0`` in the environment (:data:`ENABLED`), the basis takes the PyTorch path; the two
agree to float32 rounding (tested against float64).

Examples:
    >>> import torch
    >>> from hesd.algorithms import fused
    >>> S = torch.eye(3, 5)  # three stored vectors of 5 entries
    >>> w = torch.arange(5.0)
    >>> fused.products(S, [1, 2], w).tolist() if fused.AVAILABLE else [1.0, 2.0]
    [1.0, 2.0]
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Sequence

import numpy as np
import torch

from .inner import chunk_count, chunk_loop

__all__ = ["AVAILABLE", "ENABLED", "products", "subtract_into", "subtract_then_products", "usable"]

#: whether Numba is installed (an optional dependency, the ``fast`` extra; imported at first use, 0.1-0.2 s)
AVAILABLE = importlib.util.find_spec("numba") is not None

#: whether Lanczos uses the compiled step where it can (``HESD_FUSED=0`` in the environment turns it off)
ENABLED = os.environ.get("HESD_FUSED", "1") != "0"


def usable(store: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether the compiled step applies: Numba present and enabled, float32 CPU tensors, contiguous."""
    return (
        AVAILABLE
        and ENABLED
        and store.dtype == torch.float32
        and W.dtype == torch.float32
        and store.device.type == "cpu"
        and W.device.type == "cpu"
        and store.is_contiguous()
        and W.is_contiguous()
        and not (store.requires_grad or W.requires_grad)
    )


def products(S: torch.Tensor, rows: Sequence[int], w: torch.Tensor) -> torch.Tensor:
    """``S[rows] @ w`` accumulated in float64 (module docs); ``S`` is ``(size, n)``, ``w`` ``(n,)``.

    Returns:
        ``(len(rows),)`` float64.
    """
    idx = np.asarray(rows, dtype=np.int64)
    s, x = S.numpy(), w.numpy()
    parts = np.empty((chunk_count(x.shape[0]), len(idx)), dtype=np.float64)
    kernel = _kernels().products
    chunk_loop(parts.shape[0], lambda c0, c1: kernel(s, idx, x, parts, c0, c1))
    return torch.from_numpy(parts.sum(0))


def subtract_then_products(
    S: torch.Tensor, rows: Sequence[int], h: torch.Tensor, others: Sequence[int], w: torch.Tensor
) -> torch.Tensor:
    """``w -= S[rows]ᵀ h`` in place, then ``S[others] @ w`` and ``w @ w`` (module docs).

    Returns:
        ``(len(others) + 1,)`` float64: the inner products, then the squared norm.
    """
    idx, oth = np.asarray(rows, dtype=np.int64), np.asarray(others, dtype=np.int64)
    coef = h.to(torch.float32).numpy()
    s, x = S.numpy(), w.numpy()
    parts = np.empty((chunk_count(x.shape[0]), len(oth) + 1), dtype=np.float64)
    kernel = _kernels().subtract_products
    chunk_loop(parts.shape[0], lambda c0, c1: kernel(s, idx, coef, oth, x, parts, c0, c1))
    return torch.from_numpy(parts.sum(0))


def subtract_into(S: torch.Tensor, rows: Sequence[int], h: torch.Tensor, w: torch.Tensor, target: int, beta: float):
    """``S[target] = (w - S[rows]ᵀ h) / beta`` in one sweep; ``target`` may be one of ``rows`` (module docs)."""
    idx = np.asarray(rows, dtype=np.int64)
    coef = h.to(torch.float32).numpy()
    s, x = S.numpy(), w.numpy()
    b = np.float32(beta)
    kernel = _kernels().subtract_into
    chunk_loop(chunk_count(x.shape[0]), lambda c0, c1: kernel(s, idx, coef, x, target, b, c0, c1))


@functools.cache
def _kernels():
    """:mod:`hesd.algorithms.fused_kernels`, imported (and Numba with it) at first use."""
    return importlib.import_module(".fused_kernels", __package__)
