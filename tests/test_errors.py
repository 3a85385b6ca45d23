"""The error contract: every public function refuses bad input with a HesdError subclass (that is also
the matching built-in) whose message names the function and the problem, before any work starts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hesd
from hesd.analysis import (
    BestHeldout,
    HighestCtAmongMP,
    ResultStore,
    analyze_blocks,
    discover_checkpoints,
    load_state_dict,
)
from hesd.collectives import resolve_group
from hesd.distributed import shard
from hesd.interfaces.report import build_report
from hesd.operators import LinearOperator, MatrixOperator, ParameterLayout, as_operator
from hesd.training import make_optimizer

CE = nn.functional.cross_entropy


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,), generator=g)


def _spectrum():
    return hesd.slq(torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64)), num_steps=3, num_probes=1)


A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))

# (what is wrong, the call, the built-in it must also be, a phrase of the message)
BAD_CALLS = [
    ("model not a module", lambda: hesd.HessianOperator(lambda x: x, CE, _data()), TypeError, "nn.Module"),
    ("loss not callable", lambda: hesd.HessianOperator(_model(), 3, _data()), TypeError, "loss_fn"),
    (
        "reduction none",
        lambda: hesd.HessianOperator(_model(), nn.CrossEntropyLoss(reduction="none"), _data()),
        ValueError,
        "reduction",
    ),
    ("lone tensor", lambda: hesd.HessianOperator(_model(), CE, torch.randn(3, 3)), TypeError, "lone tensor"),
    ("data not iterable", lambda: hesd.HessianOperator(_model(), CE, 3), TypeError, "data must be"),
    ("empty data", lambda: hesd.HessianOperator(_model(), CE, []), ValueError, "empty"),
    ("unknown method", lambda: hesd.HessianOperator(_model(), CE, _data(), hvp_method="x"), ValueError, "hvp_method"),
    ("unknown mode", lambda: hesd.HessianOperator(_model(), CE, _data(), model_mode="x"), ValueError, "model_mode"),
    (
        "unknown bn form",
        lambda: hesd.HessianOperator(_model(), CE, _data(), eval_batchnorm="x"),
        ValueError,
        "eval_batchnorm",
    ),
    ("bad width", lambda: hesd.HessianOperator(_model(), CE, _data(), batch_columns=0), ValueError, "batch_columns"),
    (
        "negative budget",
        lambda: hesd.HessianOperator(_model(), CE, _data(), memory_budget=-1),
        ValueError,
        "memory_budget",
    ),
    (
        "func in train mode",
        lambda: hesd.HessianOperator(_model(), CE, _data(), model_mode="train", hvp_method="func"),
        ValueError,
        "model_mode='train'",
    ),
    (
        "dropout in train mode",
        lambda: hesd.HessianOperator(
            nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)).double(), CE, _data(), model_mode="train"
        ),
        ValueError,
        "dropout",
    ),
    ("unknown parameter", lambda: hesd.HessianOperator(_model(), CE, _data(), params=["nope"]), ValueError, "nope"),
    (
        "pattern matching nothing",
        lambda: hesd.HessianOperator(_model(), CE, _data(), params=["x.*"]),
        ValueError,
        "match no trainable",
    ),
    (
        "frozen parameter",
        lambda: hesd.HessianOperator(_model().requires_grad_(False), CE, _data()),
        ValueError,
        "no trainable",
    ),
    ("layout of nothing", lambda: ParameterLayout.select(_model(), []), ValueError, "selects no parameters"),
    (
        "exact_hessian bad params",
        lambda: hesd.exact_hessian(_model(), CE, _data(), params=["nope"]),
        ValueError,
        "nope",
    ),
    ("vector of the wrong size", lambda: MatrixOperator(A) @ torch.ones(2, dtype=torch.float64), ValueError, "shape"),
    ("vector of the wrong dtype", lambda: MatrixOperator(A) @ torch.ones(3), TypeError, "dtype"),
    ("vector not a tensor", lambda: MatrixOperator(A) @ np.ones(3), TypeError, "torch.Tensor"),
    ("non-square matrix", lambda: MatrixOperator(torch.ones(2, 3, dtype=torch.float64)), ValueError, "square"),
    ("not an operator", lambda: as_operator("A"), TypeError, "expected a hesd operator"),
    ("eigenvalues k", lambda: hesd.eigenvalues(A, k=0), ValueError, "k must be"),
    ("eigenvalues k too large", lambda: hesd.eigenvalues(A, k=5), ValueError, "larger than"),
    ("eigenvalues which", lambda: hesd.eigenvalues(A, which="XX"), ValueError, "which"),
    ("eigenvalues tol", lambda: hesd.eigenvalues(A, tol=0), ValueError, "tol"),
    ("lanczos start", lambda: hesd.lanczos(A, torch.ones(2, dtype=torch.float64), 2), ValueError, "v0"),
    ("lanczos zero start", lambda: hesd.lanczos(A, torch.zeros(3, dtype=torch.float64), 2), ValueError, "non-zero"),
    ("power k", lambda: hesd.power_iteration(A, k=4), ValueError, "larger than"),
    ("slq steps", lambda: hesd.slq(A, num_steps=0), ValueError, "num_steps"),
    ("slq reorth", lambda: hesd.slq(A, num_steps=2, reorth="x"), ValueError, "reorth"),
    ("slq stop_tol", lambda: hesd.slq(A, num_steps=2, stop_tol=-1.0), ValueError, "stop_tol"),
    ("trace method", lambda: hesd.trace(A, method="x"), ValueError, "method"),
    ("trace products", lambda: hesd.trace(A, method="hutchpp", num_matvecs=2), ValueError, "num_matvecs"),
    ("spectrum shapes", lambda: hesd.Spectrum.from_ritz([[1.0, 2.0]], [[1.0]]), ValueError, "weights"),
    ("spectrum sigma", lambda: _spectrum().density(sigma=0), ValueError, "sigma"),
    ("criteria of a non-spectrum", lambda: hesd.criteria([1, 2]), TypeError, "Spectrum"),
    ("criteria n", lambda: hesd.criteria(_spectrum(), n=0), ValueError, "n must be positive"),
    ("criteria aggregate", lambda: hesd.criteria(_spectrum(), aggregate="x"), ValueError, "aggregate"),
    ("settings steps", lambda: hesd.AnalysisSettings(num_steps=0), ValueError, "num_steps"),
    ("settings dtype", lambda: hesd.AnalysisSettings(dtype="float16"), ValueError, "dtype"),
    ("settings threshold", lambda: hesd.AnalysisSettings(ct_threshold=0.5), ValueError, "ct_threshold"),
    ("settings memory", lambda: hesd.AnalysisSettings(max_memory=0), ValueError, "max_memory"),
    ("qs rule", lambda: hesd.QSRule(lambda_frac=2.0), ValueError, "lambda_frac"),
    ("selection threshold", lambda: HighestCtAmongMP(ct_threshold=1.0), ValueError, "ct_threshold"),
    ("selection mode", lambda: BestHeldout(mode="x"), ValueError, "mode"),
    ("no checkpoints", lambda: discover_checkpoints("/nonexistent/*.pt"), FileNotFoundError, "matches nothing"),
    ("missing checkpoint", lambda: load_state_dict("/nonexistent.pt"), ValueError, "no such checkpoint"),
    (
        "series parallel mode",
        lambda: hesd.analyze_checkpoints(_model, "/nonexistent", _data(), parallel="x"),
        ValueError,
        "parallel",
    ),
    (
        "blocks pattern",
        lambda: analyze_blocks(_model(), _data(), blocks={"b": ["x.*"]}),
        ValueError,
        "match no trainable",
    ),
    ("monitor model", lambda: hesd.Monitor("model", _data()), TypeError, "nn.Module"),
    ("monitor every", lambda: hesd.Monitor(_model(), _data(), every=0), ValueError, "every"),
    ("report folder", lambda: build_report("/nonexistent"), FileNotFoundError, "no hesd results"),
    ("shard of a non-tensor batch", lambda: shard(([[1.0]], torch.ones(1)), rank=0, world=2), TypeError, "tensors"),
    ("default group without init", lambda: resolve_group(True), RuntimeError, "init_process_group"),
    ("unknown optimizer", lambda: make_optimizer("x", _model().parameters(), 0.1), ValueError, "unknown optimizer"),
]


@pytest.mark.parametrize("what, call, builtin, phrase", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_input_raises_a_hesd_error(what, call, builtin, phrase):
    with pytest.raises(hesd.HesdError) as info:
        call()
    assert isinstance(info.value, builtin), (what, type(info.value))
    assert phrase in str(info.value), (what, str(info.value))


def test_a_mismatched_results_folder_is_refused(tmp_path):
    ResultStore(tmp_path, {"analysis": {"num_steps": 1}})
    with pytest.raises(hesd.HesdError, match="other settings"):
        ResultStore(tmp_path, {"analysis": {"num_steps": 2}})


# Problems found on first use of the data, still before any product's result is returned.
BAD_DATA = [
    ("no samples", iter([]), ValueError, "no samples"),
    (
        "non-finite loss",
        (torch.full((4, 3), float("nan"), dtype=torch.float64), torch.zeros(4, dtype=torch.long)),
        FloatingPointError,
        "loss is nan",
    ),
    ("dict batch", [{"x": torch.ones(2, 3)}], TypeError, "got a dict"),
    ("batch of three", [(torch.ones(2, 3), torch.ones(2), torch.ones(2))], TypeError, "length 3"),
]


@pytest.mark.parametrize("what, data, builtin, phrase", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_raises_a_hesd_error_on_first_use(what, data, builtin, phrase):
    op = hesd.HessianOperator(_model(), CE, data)
    with pytest.raises(hesd.HesdError) as info:
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    assert isinstance(info.value, builtin) and phrase in str(info.value), (what, str(info.value))


def test_non_scalar_loss_and_nondeterminism_raise_hesd_errors():
    op = hesd.HessianOperator(_model(), lambda o, y: o.sum(1), _data())
    with pytest.raises(hesd.HesdValueError, match="scalar"):
        op.prepare()

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x + 0.1 * torch.randn_like(x))

    with pytest.raises(hesd.NonDeterministicError):
        hesd.HessianOperator(Noisy().double(), CE, _data()).prepare()


def test_every_exception_class_is_a_hesd_error():
    names = [n for n in dir(hesd.errors) if n.endswith("Error") and n != "HesdError"]
    assert len(names) >= 10
    for name in names:
        cls = getattr(hesd.errors, name)
        assert issubclass(cls, hesd.HesdError), name
        assert issubclass(cls, (ValueError, TypeError, RuntimeError, OSError, ArithmeticError)), name
    assert issubclass(LinearOperator, object)  # the operator base stays importable from its layer
