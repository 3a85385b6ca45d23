"""Inner products and norms of long float32 vectors, and the Ritz values that depend on them.

On the CPU, BLAS's float32 dot/gemv and PyTorch's float32 ``vector_norm`` accumulate sequentially
in a few lanes; over millions of entries their error reached 1e-4 to 1e-2 (hesd.algorithms.inner),
and Lanczos normalised its vectors with it: Ritz values of a diagonal operator came out 5e-4
above its largest eigenvalue at 2^24 entries.
"""

from __future__ import annotations

import torch

import hesd
from hesd.algorithms.inner import inner, norms
from hesd.operators.linear import LinearOperator

N = 1 << 23


def test_inner_and_norms_of_long_float32_vectors_are_float64_accurate():
    g = torch.Generator().manual_seed(0)
    Q = torch.rand(2, 3, N, generator=g) * 2 - 1
    W = Q[:, 0] + 0.1 * torch.rand(2, N, generator=g)
    want = torch.einsum("bkn,bn->bk", Q.double(), W.double())
    got = inner(Q, W)
    assert got.dtype == torch.float64
    assert float(((got - want).abs() / want.abs()).max()) < 1e-12
    want_norms = W.double().norm(dim=1)
    assert float(((norms(W) - want_norms).abs() / want_norms).max()) < 1e-12


class _Diagonal(LinearOperator):
    def __init__(self, d: torch.Tensor) -> None:
        self.d, self.shape, self.dtype, self.device = d, (d.numel(), d.numel()), d.dtype, d.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.d[:, None] * V


def test_ritz_values_of_a_long_float32_operator_stay_below_its_largest_eigenvalue():
    # float32 diagonal with spectrum in [-1, 1] plus 3.0 and 2.9: no Ritz value may exceed 3 beyond rounding
    d = torch.rand(N, generator=torch.Generator().manual_seed(1)) * 2 - 1
    d[0], d[1] = 3.0, 2.9
    op = _Diagonal(d)
    top = float(hesd.eigenvalues(op, k=1, tol=1e-6, max_basis=20, warn=False).eigenvalues[0])
    assert abs(top - 3.0) < 3e-6, top
    ritz = float(max(hesd.slq(op, num_steps=20, num_probes=1, seed=0).values[0]))
    assert ritz < 3.0 + 3e-6, ritz
    assert abs(float(hesd.power_iteration(op, k=1, tol=1e-7, max_iter=400, warn=False).eigenvalues[0]) - 3.0) < 3e-6
