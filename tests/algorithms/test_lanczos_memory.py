"""What the Lanczos recurrence holds beside its basis, counted during each product."""

from __future__ import annotations

import gc

import pytest
import torch

import hesd
from hesd.operators.linear import MatrixOperator


class _Census(MatrixOperator):
    """A dense operator that, at each product, counts the live storages of ``b`` vectors of ``n`` entries."""

    def __init__(self, matrix: torch.Tensor, b: int) -> None:
        super().__init__(matrix)
        self.vector_bytes = b * matrix.shape[0] * matrix.element_size()
        self.counts: list[int] = []

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        gc.collect()
        ptrs = {
            t.untyped_storage().data_ptr()
            for t in gc.get_objects()
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() == self.vector_bytes
        }
        self.counts.append(len(ptrs))
        return super()._matmat(V)


@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize(("reorth", "kw", "held"), [
    ("full", {}, 0),  # the current vector is a view of the basis; no previous vector
    ("window", {"window": 3}, 0),
    ("window", {"window": 1}, 3),  # cannot project: q_j, q_{j-1} are its own (+ the window: b × n entries too)
    ("none", {}, 2),
])  # fmt: skip
def test_lanczos_holds_no_vector_of_its_own_beside_a_basis_that_stores_q_prev_and_q(b, reorth, kw, held):
    torch.manual_seed(0)
    n = 257  # no other tensor of the test has b * n entries
    X = torch.randn(n, n, dtype=torch.float64)
    op = _Census((X + X.T) / 2, b)
    V0 = torch.randn(n, b, dtype=torch.float64)
    res = hesd.algorithms.lanczos_lockstep(op, V0, 12, reorth=reorth, **kw)
    assert all(r.num_matvecs == 12 for r in res)
    # V0 (the caller's) is one storage; after the first step the recurrence adds only what it holds itself
    assert op.counts[1:] == [1 + held] * 11, op.counts


class _HintedCensus(_Census):
    """:class:`_Census` with a start direction (as :class:`hesd.HessianOperator` offers its gradient)."""

    def __init__(self, matrix: torch.Tensor, hint: torch.Tensor) -> None:
        super().__init__(matrix, 1)
        self.hint = torch.cat([hint, hint[:1]])  # kept in a storage of n + 1 entries: not counted

    def start_direction(self) -> torch.Tensor | None:
        return self.hint[:-1].clone()  # a fresh vector of n entries, as the operator's gradient is to the caller


@pytest.mark.parametrize("hinted", [False, True])
@pytest.mark.parametrize("max_basis", [6, 40])  # restarted, and not
def test_eigenvalues_holds_no_vector_beside_its_basis_during_a_product(hinted, max_basis):
    torch.manual_seed(1)
    n = 257
    U, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    lam = torch.cat([torch.rand(n - 1, dtype=torch.float64), torch.tensor([1.5], dtype=torch.float64)])
    A = (U * lam) @ U.T  # a gap below λmax: a few restarts of a 6-vector basis, not hundreds
    del lam  # n entries: it would be counted
    op = _HintedCensus(A, torch.randn(n, dtype=torch.float64)) if hinted else _Census(A, 1)
    r = hesd.eigenvalues(op, k=1, tol=1e-8, max_basis=max_basis, seed=0, start_hint=hinted)
    assert r.converged and abs(float(r.eigenvalues[0]) - 1.5) < 1e-6
    assert len(op.counts) == r.num_matvecs and (r.info["restarts"] > 0) == (max_basis == 6)
    # the basis is one (m + 1) x n storage; the start hint, the last product's output and the vector that
    # follows a restart are gone before the next product (each held 1 x n before; hint: through every product)
    assert op.counts == [0] * r.num_matvecs, op.counts
