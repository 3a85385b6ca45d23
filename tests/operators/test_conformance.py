"""Conformance: every product path of HessianOperator on every family of layers users train, against
the exact dense Hessian in float64 (itself checked against central differences of the gradient).

The matrix crosses the cases of ``conformance_cases.py`` (linear, convolutions 1-3d and transposed,
BatchNorm in eval and train mode, GroupNorm, InstanceNorm, LayerNorm, RMSNorm, embeddings with
padding, attention through SDPA, GRU and LSTM, weight tying, frozen and unused parameters; MSE,
Huber, cross-entropy with and without label smoothing, NLL and BCE losses; unequal batches) with every
``hvp_method``, block widths 1, 3 and 8 and the CPU's block-width trial, in float64 and float32.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import hesd
from conformance_cases import CASES, build
from hesd.operators.tuning import BlockWidthTrial

METHODS = ["auto", "graph", "double_backward", "func"]
WIDTHS = [1, 3, 8, None]
BY_NAME = {c.name: c for c in CASES}


def _full_loss(model, case, batches):
    """The loss over all the data, written out independently of hesd: Σ_b (n_b / N) ℓ_b."""
    N = sum(len(y) for _, y in batches)
    return sum(case.loss(model(X), y) * (len(y) / N) for X, y in batches)


def _central_differences(model, case, batches, h=1e-5):
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.train(case.model_mode == "train")

    def grad():
        g = torch.autograd.grad(_full_loss(model, case, batches), params, allow_unused=True, materialize_grads=True)
        return torch.cat([t.reshape(-1) for t in g])

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    cols = []
    with torch.enable_grad():
        for i in range(flat.numel()):
            step = torch.zeros_like(flat)
            step[i] = h
            torch.nn.utils.vector_to_parameters(flat + step, params)
            plus = grad()
            torch.nn.utils.vector_to_parameters(flat - step, params)
            cols.append((plus - grad()) / (2 * h))
    torch.nn.utils.vector_to_parameters(flat, params)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])  # train-mode BatchNorm updated its running statistics
    model.eval()
    return torch.stack(cols, dim=1)


@functools.cache
def reference(name: str) -> torch.Tensor:
    case = BY_NAME[name]
    model, batches = build(case)
    return hesd.exact_hessian(model, case.loss, batches, model_mode=case.model_mode)


@pytest.mark.parametrize("name", BY_NAME)
def test_reference_is_the_hessian_by_central_differences(name):
    case = BY_NAME[name]
    model, batches = build(case)
    H = reference(name)
    assert H.abs().max() > 0 and torch.allclose(H, H.T, atol=1e-12)
    fd = _central_differences(model, case, batches)
    assert (H - fd).abs().max() < 1e-6 * max(1.0, float(H.abs().max())), name


def _operator(name, method, width, dtype):
    case = BY_NAME[name]
    model, batches = build(case)
    if dtype == torch.float32:
        model = model.float()
        batches = [(X.float() if X.is_floating_point() else X, y.float() if y.is_floating_point() else y)
                   for X, y in batches]  # fmt: skip
    op = hesd.HessianOperator(model, case.loss, batches, hvp_method=method, batch_columns=width,
                              model_mode=case.model_mode)  # fmt: skip
    if width is None:  # the CPU's trial, its 5 ms limit lifted so that it always tries blocks
        op.blocks.width_trial = BlockWidthTrial(max_seconds=math.inf)
    return op


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("width", WIDTHS, ids=lambda w: f"cols{w}")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", BY_NAME)
def test_products_equal_the_dense_hessian(name, method, width, dtype):
    case = BY_NAME[name]
    if method == "func" and case.model_mode == "train":
        with pytest.raises(hesd.HesdValueError, match="cannot run in model_mode='train'"):
            _operator(name, method, width, dtype)
        return
    H = reference(name)
    op = _operator(name, method, width, dtype)
    k = 20 if width is None else 9  # the trial: 8 single columns, a warm-up block, a timed block
    V = torch.randn(H.shape[0], k, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    HV = op @ V.to(dtype)
    scale = max(1.0, float(H.abs().max()))
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    err = float((HV.double() - H @ V).abs().max()) / scale
    assert err < tol, (name, method, width, err)
    assert op.num_matvecs == k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", BY_NAME)
def test_finite_difference_products_equal_the_dense_hessian_to_their_error_bound(name, dtype):
    """Central differences of the gradient at the default step: about u^(2/3) relative error
    (hesd.operators.finite_difference); measured at most 5e-10 in float64 and 3.2e-4 in float32."""
    case = BY_NAME[name]
    H = reference(name)
    op = _operator(name, "finite_difference", 1, dtype)
    V = torch.randn(H.shape[0], 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    before = [p.detach().clone() for p in op.model.parameters()]
    HV = op @ V.to(dtype)
    assert all(torch.equal(a, b) for a, b in zip(before, op.model.parameters(), strict=True)), name
    tol = 2e-9 if dtype == torch.float64 else 1e-3
    err = float((HV.double() - H @ V).abs().max()) / max(1.0, float(H.abs().max()))
    assert err < tol, (name, case.model_mode, err)
