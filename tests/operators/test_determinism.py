"""The determinism check of the first-order pass: forward passes only, over the loss on all the data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesd
from hesd.errors import NonDeterministicError

CE = nn.functional.cross_entropy


def _data(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


class _Loader:
    """Batches of 4 from a permutation of the samples (a new one per pass if ``reshuffle``), or from
    a different subset of 8 of the 12 samples each pass if ``drop``."""

    def __init__(self, X, y, reshuffle: bool = False, drop: bool = False) -> None:
        self.X, self.y, self.reshuffle, self.drop, self.passes = X, y, reshuffle, drop, 0

    def __iter__(self):
        n = len(self.y)
        g = torch.Generator().manual_seed(self.passes if (self.reshuffle or self.drop) else 0)
        self.passes += 1
        order = torch.randperm(n, generator=g)[: 8 if self.drop else n]
        for i in range(0, len(order), 4):
            yield self.X[order[i : i + 4]], self.y[order[i : i + 4]]


def _backward_counter(model: nn.Module) -> list[int]:
    calls = [0]
    model[0].weight.register_hook(lambda g: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("check", [True, False])
def test_the_check_runs_forward_passes_only(check):
    """The first-order pass runs one backward per batch whether or not it checks determinism."""
    X, y = _data()
    model = _model()
    calls = _backward_counter(model)
    forwards = [0]
    model.register_forward_hook(lambda m, i, o: forwards.__setitem__(0, forwards[0] + 1))
    op = hesd.HessianOperator(model, CE, _Loader(X, y), hvp_method="double_backward", check_deterministic=check)
    op.prepare()
    assert calls[0] == 3  # three batches of four
    assert forwards[0] == (6 if check else 3)


def test_a_loader_that_reshuffles_the_samples_passes_and_gives_the_same_products():
    """Reshuffling between batches leaves the loss over all the data, and its Hessian, unchanged."""
    X, y = _data()
    v = torch.randn(sum(p.numel() for p in _model().parameters()), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(5))  # fmt: skip
    fixed = hesd.HessianOperator(_model(), CE, _Loader(X, y), hvp_method="double_backward")
    shuffled = hesd.HessianOperator(_model(), CE, _Loader(X, y, reshuffle=True), hvp_method="double_backward")
    torch.testing.assert_close(shuffled @ v, fixed @ v, rtol=1e-12, atol=1e-12)
    assert abs(shuffled.state.loss - fixed.state.loss) < 1e-14


def test_a_loader_that_drops_other_samples_each_pass_is_refused():
    X, y = _data()
    op = hesd.HessianOperator(_model(), CE, _Loader(X, y, drop=True), hvp_method="double_backward")
    with pytest.raises(NonDeterministicError, match="drop_last with shuffling"):
        op.prepare()
