"""BatchNorm with running statistics evaluated as an affine map: the same Hessian as PyTorch's kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hesd
from helpers import BNCNN
from hesd.operators.batchnorm import AffineEvalBatchNorm, has_running_stat_batchnorm

CE = nn.functional.cross_entropy
METHODS = ("auto", "graph", "double_backward", "func")


def _randomise_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.3)
            if m.affine:
                m.weight.data.copy_(torch.randn(c, generator=g, dtype=torch.float64))
                m.bias.data.copy_(torch.randn(c, generator=g, dtype=torch.float64))


class BN1d(nn.Module):
    """BatchNorm1d on (N, C) and on (N, C, L), one without affine parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.bn_seq = nn.BatchNorm1d(2, affine=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.fc(x)))
        h = torch.tanh(self.bn_seq(self.conv(h[:, None, :])))
        return self.head(h.flatten(1))


class BN3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 2)
        self.bn = nn.BatchNorm3d(2, momentum=None)
        self.head = nn.Linear(2 * 2 * 2 * 2, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.conv(x))).flatten(1))


CASES = {"bn1d": (BN1d, (4,)), "bn2d": (BNCNN, (1, 4, 4)), "bn3d": (BN3d, (1, 3, 3, 3))}


def _case(name: str, seed: int = 0, n: int = 13, batch: int = 5):
    factory, shape = CASES[name]
    torch.manual_seed(seed)
    model = factory().double()
    _randomise_bn(model, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    X = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, [(X[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _graph_node_names(t: torch.Tensor) -> set[str]:
    seen, names, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_affine_form_matches_pytorch_kernel_dense_hessian(name, method):
    model, batches = _case(name, seed=len(name) + len(method))
    H = hesd.exact_hessian(model, CE, batches)  # PyTorch's own batch_norm (eval_batchnorm="native")
    op = hesd.HessianOperator(model, CE, batches, hvp_method=method, batch_columns=3)
    assert op.eval_batchnorm == "affine" and op.forward.affine_batchnorm
    V = torch.randn(H.shape[0], 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert (op @ V - H @ V).abs().max() < 1e-10 * max(1.0, float(H.abs().max())), (name, method)
    assert (op @ V[:, 0] - H @ V[:, 0]).abs().max() < 1e-10 * max(1.0, float(H.abs().max()))
    native = hesd.HessianOperator(model, CE, batches, hvp_method=method, eval_batchnorm="native")
    assert abs(op.loss() - native.loss()) < 1e-13
    assert (op.gradient() - native.gradient()).abs().max() < 1e-13


def test_kept_graph_has_no_batchnorm_node_in_affine_form_only():
    model, batches = _case("bn2d")
    affine = hesd.HessianOperator(model, CE, batches, hvp_method="graph")
    native = hesd.HessianOperator(model, CE, batches, hvp_method="graph", eval_batchnorm="native")
    affine.prepare()
    native.prepare()
    names_affine = _graph_node_names(affine.state.kept[0].flat)
    names_native = _graph_node_names(native.state.kept[0].flat)
    assert any("NativeBatchNorm" in n for n in names_native)
    assert not any("BatchNorm" in n for n in names_affine)


def test_batch_statistics_and_train_mode_are_left_to_pytorch():
    # track_running_stats=False: eval-mode BatchNorm normalises with batch statistics; not affine.
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Tanh(),
                          nn.Linear(5, 3)).double()  # fmt: skip
    assert not has_running_stat_batchnorm(model)
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)
    op = hesd.HessianOperator(model, CE, (X, y))
    assert not op.forward.affine_batchnorm
    H = hesd.exact_hessian(model, CE, (X, y))
    v = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
    assert (op @ v - H @ v).abs().max() < 1e-10
    # The mode itself passes batch-statistics calls through unchanged.
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    with AffineEvalBatchNorm():
        out = nn.functional.batch_norm(x, None, None, training=True)
    assert torch.equal(out, nn.functional.batch_norm(x, None, None, training=True))
    # model_mode="train" uses batch statistics: no interception.
    model2, batches = _case("bn2d")
    assert not hesd.HessianOperator(model2, CE, batches, model_mode="train").forward.affine_batchnorm


def test_mixed_dtypes_fall_through_to_pytorch():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 3, 2, generator=g, dtype=torch.float32)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    with pytest.raises(RuntimeError):  # PyTorch's own error for mixed dtypes, not a silent promotion
        with AffineEvalBatchNorm():
            nn.functional.batch_norm(x, mean, var, training=False)
    same = (mean.float(), var.float())
    with AffineEvalBatchNorm():
        out = nn.functional.batch_norm(x, *same, training=False, eps=1e-3)
    assert torch.allclose(out, nn.functional.batch_norm(x, *same, training=False, eps=1e-3), atol=1e-6)


def test_model_outputs_and_mode_unchanged():
    model, batches = _case("bn1d")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    op = hesd.HessianOperator(model, CE, batches)
    op @ torch.randn(op.shape[0], dtype=torch.float64)
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    model.eval()
    out = model(batches[0][0])
    assert "NativeBatchNormBackward0" in _graph_node_names(out)  # no mode left active: PyTorch's kernel


def test_bad_eval_batchnorm_is_refused():
    model, batches = _case("bn2d")
    with pytest.raises(ValueError, match="eval_batchnorm must be one of"):
        hesd.HessianOperator(model, CE, batches, eval_batchnorm="fold")
