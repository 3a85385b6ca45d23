"""Where PyTorch 2.13 cannot take the derivatives a product method needs: each gap shown on PyTorch
alone, then what hesd does about it (an exact fallback, an equivalent form, or a clear error)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp

import hesd
from conformance_cases import CASES, build

GROUPNORM = next(c for c in CASES if c.name == "conv1d_groupnorm_mse")


def test_pytorch_cannot_batch_groupnorm_double_backward():
    """The gap itself: aten::native_group_norm's double backward under ``is_grads_batched``."""
    g = torch.Generator().manual_seed(0)
    norm = nn.GroupNorm(2, 4).double()
    x = torch.randn(8, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    first = torch.autograd.grad(torch.tanh(norm(x)).pow(2).sum(), list(norm.parameters()), create_graph=True)
    flat = torch.cat([t.reshape(-1) for t in first])
    V = torch.randn(3, flat.numel(), generator=g, dtype=torch.float64)
    try:
        torch.autograd.grad(flat, list(norm.parameters()), grad_outputs=V, is_grads_batched=True)
    except RuntimeError as exc:
        assert "must match the size" in str(exc)
    else:  # pragma: no cover - a later PyTorch
        pytest.skip("this PyTorch batches GroupNorm's double backward: hesd's fallback is no longer taken")


@pytest.mark.parametrize("method", ["auto", "graph", "double_backward"])
def test_groupnorm_blocks_fall_back_once_with_one_note_and_stay_exact(method, caplog):
    model, batches = build(GROUPNORM)
    H = hesd.exact_hessian(model, GROUPNORM.loss, batches)
    op = hesd.HessianOperator(model, GROUPNORM.loss, batches, hvp_method=method, batch_columns=4)
    V = torch.randn(H.shape[0], 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="hesd"):
        for _ in range(3):
            assert (op @ V - H @ V).abs().max() < 1e-10 * float(H.abs().max())
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "GroupNorm" in notes[0] and "native_group_norm" in notes[0]
    if method == "auto":  # the batched backward fails; vmap of forward-over-reverse batches GroupNorm
        assert op.block_method == "func" and op.batch_columns == 4 and "vmap" in notes[0]
    else:  # a fixed method: one column per pass
        assert op.batch_columns == 1 and "one column per pass" in notes[0]
    assert op.batched_failure == notes[0]
    # The CPU's block-width trial meets the same failure and gives blocks up for good.
    trial = hesd.HessianOperator(model, GROUPNORM.loss, batches, hvp_method="graph")
    trial.blocks.width_trial = hesd.operators.tuning.BlockWidthTrial(max_seconds=float("inf"))
    W = torch.randn(H.shape[0], 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert (trial @ W - H @ W).abs().max() < 1e-10 * float(H.abs().max())
    assert trial.batch_columns == 1 and trial.blocks.width_trial.done and trial.num_matvecs == 20


@pytest.mark.parametrize(
    "loss",
    [F.mse_loss, F.huber_loss, F.soft_margin_loss],
    ids=["mse", "huber", "soft_margin"],
)
def test_losses_without_forward_mode_derivatives_are_exact_in_forward_over_reverse(loss):
    g = torch.Generator().manual_seed(3)
    X, w = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    y = (
        torch.randn(6, 2, generator=g, dtype=torch.float64).sign()
        if loss is F.soft_margin_loss
        else torch.randn(6, 2, generator=g, dtype=torch.float64)
    )
    with pytest.raises(RuntimeError, match="ZeroTensors are immutable|forward AD"):  # PyTorch alone
        jvp(grad(lambda w: loss(torch.tanh(X @ w), y)), (w,), (torch.ones_like(w),))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batches = [(X[:4], y[:4]), (X[4:], y[4:])]
    H = hesd.exact_hessian(model, loss, batches)
    V = torch.randn(H.shape[0], 5, generator=g, dtype=torch.float64)
    for width in (1, 5):
        op = hesd.HessianOperator(model, loss, batches, hvp_method="func", batch_columns=width)
        assert (op @ V - H @ V).abs().max() < 1e-10 * float(H.abs().max())


def test_float32_lstm_runs_off_onednn_in_forward_over_reverse():
    lstm = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(5, 4, 3)
    params = {n: p.detach() for n, p in lstm.named_parameters()}
    tangents = {n: torch.ones_like(p) for n, p in params.items()}

    def loss(pd):
        return torch.func.functional_call(lstm, pd, (x,))[0].pow(2).mean()

    with pytest.raises(RuntimeError, match="mkldnn_rnn_layer"):  # PyTorch alone, oneDNN on
        jvp(grad(loss), (params,), (tangents,))
    case = next(c for c in CASES if c.name == "lstm_bce")
    model, batches = build(case)
    H = hesd.exact_hessian(model, case.loss, batches)
    batches32 = [(X.float(), y.float()) for X, y in batches]
    op = hesd.HessianOperator(model.float(), case.loss, batches32, hvp_method="func")
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(4))
    assert (op @ v - (H @ v.double()).float()).abs().max() < 2e-4 * float(H.abs().max())
    assert torch.backends.mkldnn.enabled  # restored


class _SquareBackward(torch.autograd.Function):
    """``2 x g`` with a forward-mode derivative and no backward: a double backward fails."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, g):
        return 2 * x * g

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, out):
        raise RuntimeError("derivative for _SquareBackward is not implemented")

    @staticmethod
    def jvp(ctx, tx, tg):
        x, g = ctx.saved_tensors
        return 2 * (tx * g + x * tg)


class _Square(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _SquareBackward.apply(x, g)

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 2 * x * t


class _CustomSquare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(_Square.apply(torch.tanh(self.fc(x))))


def test_auto_moves_to_forward_over_reverse_when_double_backward_is_missing(caplog):
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = _CustomSquare().double()
    batches = [(torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g))
               for n in (5, 3)]  # fmt: skip
    with pytest.raises(hesd.UnsupportedModelError, match="no second derivative for _SquareBackward"):
        hesd.HessianOperator(model, F.cross_entropy, batches, hvp_method="graph") @ torch.ones(26, dtype=torch.float64)
    reference = hesd.HessianOperator(model, F.cross_entropy, batches, hvp_method="func", batch_columns=1)
    H = reference @ torch.eye(26, dtype=torch.float64)
    # Independent check of the reference: central differences of the gradient.
    params = list(model.parameters())
    flat = torch.nn.utils.parameters_to_vector(params).detach()

    def gradient(v):
        torch.nn.utils.vector_to_parameters(v, params)
        loss = sum(F.cross_entropy(model(X), y) * len(y) / 8 for X, y in batches)
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])

    fd = torch.stack([(gradient(flat + 1e-5 * e) - gradient(flat - 1e-5 * e)) / 2e-5 for e in torch.eye(26,
                      dtype=torch.float64)], dim=1)  # fmt: skip
    torch.nn.utils.vector_to_parameters(flat, params)
    assert (H - fd).abs().max() < 1e-6 * float(H.abs().max())
    op = hesd.HessianOperator(model, F.cross_entropy, batches)
    V = torch.randn(26, 6, generator=g, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="hesd"):
        assert (op @ V - H @ V).abs().max() < 1e-10 * float(H.abs().max())
        assert (op @ V[:, 0] - H @ V[:, 0]).abs().max() < 1e-10 * float(H.abs().max())
    assert len(caplog.records) == 1 and "forward-over-reverse" in caplog.records[0].getMessage()


@pytest.mark.parametrize("name", ["ctc", "multi_margin"])
def test_losses_pytorch_cannot_differentiate_twice_get_a_clear_error(name):
    """The exact methods name the operation and point to finite differences (test_finite_difference.py: auto)."""
    g = torch.Generator().manual_seed(6)
    if name == "ctc":
        T, N, C = 6, 3, 4
        model = nn.Linear(3, C).double()
        data = (torch.randn(N, T, 3, generator=g, dtype=torch.float64), torch.randint(1, C, (N, 3), generator=g))

        def loss(out, y):
            return F.ctc_loss(out.log_softmax(-1).transpose(0, 1), y, [T] * len(y), [3] * len(y))

        ops = ("aten::_ctc_loss_backward", "_ctc_loss")
    else:
        model = nn.Linear(3, 4).double()
        data = (torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g))
        loss = F.multi_margin_loss
        ops = ("aten::multi_margin_loss_backward", "multi_margin_loss")
    for method, named in (("graph", ops[:1]), ("func", ops[1:])):  # auto differences gradients instead
        op = hesd.HessianOperator(model, loss, data, hvp_method=method)
        with pytest.raises(hesd.UnsupportedModelError) as info:
            op @ torch.ones(op.shape[0], dtype=torch.float64)
        for o in named:
            assert o in str(info.value), (method, str(info.value))
        assert isinstance(info.value, hesd.HesdError) and isinstance(info.value, RuntimeError)
        assert "hvp_method='finite_difference'" in str(info.value)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap of affine_grid, PyTorch's note
def test_forward_mode_gap_is_named_for_func_and_auto_keeps_double_backward():
    class Warp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.theta = nn.Linear(16, 6)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            grid = F.affine_grid(self.theta(x.flatten(1)).view(-1, 2, 3), list(x.shape), align_corners=False)
            return self.head(F.grid_sample(x, grid, align_corners=False).flatten(1))

    torch.manual_seed(7)
    model = Warp().double()
    data = (torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randint(0, 2, (5,)))
    with pytest.raises(hesd.UnsupportedModelError, match="no forward-mode derivative for grid_sampler_2d"):
        hesd.HessianOperator(model, F.cross_entropy, data, hvp_method="func") @ torch.ones(136, dtype=torch.float64)
    H = hesd.exact_hessian(model, F.cross_entropy, data)
    op = hesd.HessianOperator(model, F.cross_entropy, data, batch_columns=3)
    op.blocks.method_choice = hesd.operators.tuning.BlockMethodChoice(min_seconds=0.0)  # times vmap too
    V = torch.randn(136, 3, dtype=torch.float64)
    assert (op @ V - H @ V).abs().max() < 1e-10 * float(H.abs().max())
    assert op.block_method == "graph" and op.block_timings == {"graph": op.block_timings["graph"]}
