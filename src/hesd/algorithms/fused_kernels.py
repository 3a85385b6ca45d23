"""The compiled kernels of :mod:`hesd.algorithms.fused` (Numba; imported only where it is installed).

Each kernel works on the chunks ``c0`` to ``c1`` of :data:`~hesd.algorithms.inner.CHUNK` entries,
so the chunk loop's threads (:func:`hesd.algorithms.inner.chunk_loop`) share them out; each
chunk's results go to its own row. Inner products are summed by blocks of :data:`BLOCK` entries:
each block in float32, vectorised (several accumulators of a few entries each), the blocks in
float64. Over a whole chunk in float32, as BLAS sums a chunk for :func:`hesd.algorithms.inner.inner`,
Numba's vectorised loop (fewer accumulators than MKL's) put windowed Lanczos's largest Ritz value
of a float32 diagonal operator 6.9e-6 (rms over 16 starts) from λmax = 30, against 1.6e-6 for
the PyTorch path and 1.5e-4 for an unvectorised loop; by blocks of 256, 9.0e-7
(``tests/algorithms/test_fused.py`` pins it).

Compiled with Numba's ``reassoc`` and ``contract`` flags only (reductions vectorise, multiply-adds
fuse; NaN and infinity keep their meaning), without Python's lock (the chunk loop's threads run
side by side), and cached on disk (beside this file, or in the user's cache directory where that
is read-only): 2.4 s to compile on first use on a 2-core machine, 0.3 s to load after.
"""

from __future__ import annotations

import numba
import numpy as np

from .inner import CHUNK

__all__ = ["BLOCK", "dot", "products", "subtract_into", "subtract_products"]

#: entries summed in float32 before the sum goes into a float64 total
BLOCK = 256


def _kernel(f):
    return numba.njit(f, nogil=True, cache=True, fastmath={"reassoc", "contract"}, boundscheck=False)


@_kernel
def dot(q: np.ndarray, w: np.ndarray) -> float:
    """``q @ w`` by blocks of :data:`BLOCK`: each block's sum in float32 (vectorised), the blocks' in float64."""
    n = w.shape[0]
    full = n - n % BLOCK
    total = 0.0
    for b0 in range(0, full, BLOCK):
        qb, wb = q[b0 : b0 + BLOCK], w[b0 : b0 + BLOCK]
        acc = np.float32(0.0)
        for t in range(BLOCK):  # a fixed trip count: one vectorised loop, no remainder
            acc += qb[t] * wb[t]
        total += acc
    acc = np.float32(0.0)
    for t in range(full, n):
        acc += q[t] * w[t]
    return total + acc


@_kernel
def products(S, idx, w, parts, c0, c1):
    """``parts[c, r] = S[idx[r]] @ w`` over chunk ``c``, for the chunks ``c0`` to ``c1``."""
    n = w.shape[0]
    for c in range(c0, c1):
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, n)
        wc = w[lo:hi]
        for r in range(idx.shape[0]):
            parts[c, r] = dot(S[idx[r], lo:hi], wc)


@_kernel
def subtract_products(S, idx, h, others, w, parts, c0, c1):
    """Over each chunk: ``w -= S[idx]ᵀ h``, then ``parts[c] = (S[others] @ w, w @ w)``."""
    n = w.shape[0]
    for c in range(c0, c1):
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, n)
        wc = w[lo:hi]
        for r in range(idx.shape[0]):
            q, g = S[idx[r], lo:hi], h[r]
            for t in range(hi - lo):
                wc[t] -= g * q[t]
        for r in range(others.shape[0]):  # the chunk is still in cache
            parts[c, r] = dot(S[others[r], lo:hi], wc)
        parts[c, others.shape[0]] = dot(wc, wc)


@_kernel
def subtract_into(S, idx, h, w, target, beta, c0, c1):
    """Over each chunk: ``S[target] = (w - S[idx]ᵀ h) / beta``, the target's own entries read before written."""
    n = w.shape[0]
    own = -1  # the target's position among the rows subtracted, if it is one (the oldest vector of a full window)
    for r in range(idx.shape[0]):
        if idx[r] == target:
            own = r
    for c in range(c0, c1):
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, n)
        out, wc = S[target, lo:hi], w[lo:hi]
        if own >= 0:
            g = h[own]
            for t in range(hi - lo):
                out[t] = wc[t] - g * out[t]  # reads the target's old entry before writing it
        else:
            out[:] = wc  # a slot not yet used: written without being read (a read would fault in the zero page)
        for r in range(idx.shape[0]):
            if r != own:
                q, g = S[idx[r], lo:hi], h[r]
                for t in range(hi - lo):
                    out[t] -= g * q[t]
        for t in range(hi - lo):
            out[t] /= beta
