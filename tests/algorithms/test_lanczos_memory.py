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
