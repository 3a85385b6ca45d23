"""HessianOperator and exact_hessian against finite differences and the dense Hessian, in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hesd
from helpers import make_case
from hesd.errors import NonDeterministicError, NonFiniteLossError
from hesd.operators import ParameterLayout

CE = nn.functional.cross_entropy
METHODS = ["auto", "graph", "double_backward", "func"]


def _flat_grad(model, params, X, y):
    loss = CE(model(X), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, materialize_grads=True)])


def fd_hessian(model, X, y, h=1e-5):
    """Central finite differences of the gradient over the whole data set."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    P = flat.numel()
    H = torch.empty(P, P, dtype=torch.float64)

    def set_flat(v):
        off = 0
        with torch.no_grad():
            for p in params:
                p.copy_(v[off : off + p.numel()].view_as(p))
                off += p.numel()

    for i in range(P):
        e = torch.zeros(P, dtype=torch.float64)
        e[i] = h
        set_flat(flat + e)
        gp = _flat_grad(model, params, X, y)
        set_flat(flat - e)
        gm = _flat_grad(model, params, X, y)
        H[:, i] = (gp - gm) / (2 * h)
    set_flat(flat)
    return H


def test_exact_hessian_is_symmetric_and_matches_finite_differences(case):
    name, model, batches, (X, y) = case
    H = hesd.exact_hessian(model, CE, batches)
    assert H.dtype == torch.float64
    assert torch.allclose(H, H.T, atol=1e-12), name
    H_fd = fd_hessian(model, X, y)
    scale = H.abs().max()
    assert (H - H_fd).abs().max() / scale < 1e-6, name
    # Batches of unequal size are weighted by their counts: equal to the whole-data Hessian.
    H_full = hesd.exact_hessian(model, CE, (X, y))
    assert torch.allclose(H, H_full, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_hvp_matches_dense_hessian(case, method):
    name, model, batches, _ = case
    H = hesd.exact_hessian(model, CE, batches)
    op = hesd.HessianOperator(model, CE, batches, hvp_method=method)
    assert op.shape == H.shape and op.dtype == torch.float64
    g = torch.Generator().manual_seed(1)
    V = torch.randn(H.shape[0], 3, generator=g, dtype=torch.float64)
    assert (op @ V - H @ V).abs().max() < 1e-10 * max(1.0, float(H.abs().max())), (name, method)
    v = V[:, 0]
    assert (op @ v - H @ v).abs().max() < 1e-10
    assert op.num_matvecs == 4


@pytest.mark.parametrize("method", METHODS)
def test_batched_columns_match_dense_hessian(case, method):
    """Columns pushed through one vmapped backward (``batch_columns``) equal the dense product."""
    name, model, batches, _ = case
    H = hesd.exact_hessian(model, CE, batches)
    op = hesd.HessianOperator(model, CE, batches, hvp_method=method, batch_columns=4)
    assert op.batch_columns == 4
    V = torch.randn(H.shape[0], 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    HV = op @ V  # blocks of 4 and 3 columns
    assert (HV - H @ V).abs().max() < 1e-10 * max(1.0, float(H.abs().max())), (name, method)
    assert op.num_matvecs == 7


def test_batch_columns_default_and_validation():
    model, batches, _ = make_case("mlp", seed=3)
    assert hesd.HessianOperator(model, CE, batches).batch_columns == 1  # CPU: one column per pass (measured)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="batch_columns"):
            hesd.HessianOperator(model, CE, batches, batch_columns=bad)


def test_unused_parameter_has_zero_hessian_rows():
    model, batches, _ = make_case("unused", seed=3)
    H = hesd.exact_hessian(model, CE, batches)
    n_used = sum(p.numel() for p in model.used.parameters())
    assert H.shape[0] == sum(p.numel() for p in model.parameters())
    assert H[n_used:].abs().max() == 0 and H[:, n_used:].abs().max() == 0
    assert H[:n_used, :n_used].abs().max() > 0


@pytest.mark.parametrize("method", ["graph", "double_backward", "func", "finite_difference"])
@pytest.mark.parametrize("batch_columns", [1, 2])
def test_products_write_every_entry_of_their_uninitialised_result(monkeypatch, method, batch_columns):
    """Products go into an uninitialised result (``ParameterLayout.result``): the first batch writes
    it, the others add to it. Poisoned with NaN here, every entry must still come out right —
    the rows of a parameter the loss does not reach included — over three batches of unequal
    weight, and every column must be one contiguous vector."""
    model, batches, (X, y) = make_case("unused", seed=3)
    assert len(batches) == 3
    H = fd_hessian(model, X, y)  # not through hesd's products, which write the same way
    real = ParameterLayout.result
    monkeypatch.setattr(ParameterLayout, "result", lambda self, k: real(self, k).fill_(float("nan")))
    op = hesd.HessianOperator(model, CE, batches, hvp_method=method, batch_columns=batch_columns)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for X in (V, V[:, 1]):
        HX = op @ X
        assert bool(torch.isfinite(HX).all())
        assert float((HX - H @ X).abs().max()) < 1e-7 * max(1.0, float(H.abs().max()))  # the reference's error
    assert HX.is_contiguous() and (op @ V).T.is_contiguous()  # columns as contiguous vectors


def test_a_product_makes_its_result_after_the_backward_pass_not_beside_it():
    """Where a backward pass's own transients outweigh a vector, the result adds nothing to a
    product's peak: it is made after the first block's pass. The memory planner measures that
    peak; made before the pass, one vector more turned a 124 M plan away from kept graphs."""
    from hesd.operators.first_order import flat_graph
    from hesd.operators.footprint import allocation_peak
    from hesd.operators.products import kept_graph_product

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 3))
    X, y = torch.randn(4000, 20), torch.randint(0, 3, (4000,))
    op = hesd.HessianOperator(model, CE, [(X, y)])
    objective, layout = op.objective, op.layout
    batch = objective.contract.prepare((X, y), layout.device, layout.dtype)
    with torch.enable_grad():
        flat = flat_graph(objective.gradient(objective.loss(batch, 0), create_graph=True))
        v = torch.randn(layout.dim, 1)
        _, backward = allocation_peak(lambda: torch.autograd.grad(flat, layout.params, v[:, 0], retain_graph=True),
                                      layout.device)  # fmt: skip
        out, product = allocation_peak(lambda: kept_graph_product(flat, layout, v, 1.0, 1, None), layout.device)
    vector = layout.dim * 4
    assert backward > 3 * vector  # the case: the pass's transients (4000 rows of activations) outweigh a vector
    assert product - backward < vector / 2, (product, backward, vector)
    assert torch.allclose(out[:, 0], op @ v[:, 0], rtol=1e-5, atol=1e-6)


class _Quadratic(nn.Module):
    """out = (x·w)² + b: the gradient in b is a constant (no graph), the one in w is not."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(1, dtype=torch.float64))

    def forward(self, x):
        return (x @ self.w) ** 2 + self.b


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_columns", [1, 3])
def test_gradient_partly_or_wholly_independent_of_the_parameters(method, batch_columns):
    """Batches whose gradient has no graph in some parameters (or in all) give exact zero blocks."""
    torch.manual_seed(11)
    model = _Quadratic(4)
    mean = lambda out, y: out.mean()  # noqa: E731 - a loss linear in the output
    batches = [(torch.randn(n, 4, dtype=torch.float64), torch.zeros(n)) for n in (5, 3)]
    X = torch.cat([b[0] for b in batches])
    exact = torch.zeros(5, 5, dtype=torch.float64)
    exact[:4, :4] = 2 * X.T @ X / len(X)  # d²/dw² mean((x·w)²); b enters linearly
    op = hesd.HessianOperator(model, mean, batches, hvp_method=method, batch_columns=batch_columns)
    V = torch.randn(5, 4, dtype=torch.float64)
    assert torch.allclose(op @ V, exact @ V, atol=1e-12)
    assert torch.allclose(op @ V[:, 0], exact @ V[:, 0], atol=1e-12)

    linear = nn.Linear(4, 1).double()  # loss linear in every parameter: the Hessian is zero
    op = hesd.HessianOperator(linear, mean, batches, hvp_method=method, batch_columns=batch_columns)
    assert (op @ torch.randn(5, 4, dtype=torch.float64)).abs().max() == 0


def test_frozen_parameters_are_excluded():
    model, batches, _ = make_case("frozen", seed=4)
    op = hesd.HessianOperator(model, CE, batches)
    assert op.shape[0] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert op.param_names == ["net.2.weight", "net.2.bias"]


def test_params_subset_is_the_principal_block():
    model, batches, _ = make_case("mlp", seed=5)
    H = hesd.exact_hessian(model, CE, batches)
    op = hesd.HessianOperator(model, CE, batches, params=["net.2.weight", "net.2.bias"])
    start = model.net[0].weight.numel() + model.net[0].bias.numel()
    block = H[start:, start:]
    v = torch.randn(block.shape[0], dtype=torch.float64)
    assert (op @ v - block @ v).abs().max() < 1e-12


def test_loss_value_gradient_and_num_samples():
    model, batches, (X, y) = make_case("mlp", seed=6)
    op = hesd.HessianOperator(model, CE, batches)
    assert op.num_samples == len(y)
    assert abs(op.loss() - float(CE(model(X), y).detach())) < 1e-12
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(CE(model(X), y), list(model.parameters()))])
    assert (op.gradient() - ref).abs().max() < 1e-12


def test_sum_reduction_loss_is_weighted_by_one_over_n():
    model, batches, _ = make_case("mlp", seed=7)
    H_mean = hesd.exact_hessian(model, CE, batches)
    op = hesd.HessianOperator(model, nn.CrossEntropyLoss(reduction="sum"), batches)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert (op @ v - H_mean @ v).abs().max() < 1e-12


def test_train_mode_uses_batch_statistics_and_restores_state():
    model, batches, _ = make_case("cnn", seed=8)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op_train = hesd.HessianOperator(model, CE, batches, model_mode="train")
    op_eval = hesd.HessianOperator(model, CE, batches)
    v = torch.randn(op_train.shape[0], dtype=torch.float64)
    ht, he = op_train @ v, op_eval @ v
    assert (ht - he).abs().max() > 1e-6  # batch statistics differ from running statistics
    # Reference for train mode: double backward per batch with batch statistics.
    ref = torch.zeros_like(v)
    params = list(model.parameters())
    for X, y in batches:
        loss = CE(model(X), y) * len(y) / 21
        g = torch.autograd.grad(loss, params, create_graph=True)
        gv = sum(
            (gi.reshape(-1) * vi).sum() for gi, vi in zip(g, torch.split(v, [p.numel() for p in params]), strict=True)
        )
        ref += torch.cat([h.reshape(-1) for h in torch.autograd.grad(gv, params)])
    for k, t in before.items():  # the reference above updated running stats; restore to compare ours
        model.state_dict()[k].copy_(t)
    assert (ht - ref).abs().max() < 1e-10
    op_train @ v
    assert model.training  # mode restored
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k  # running statistics untouched


def test_model_mode_restored_after_eval_products():
    model, batches, _ = make_case("cnn", seed=9)
    model.train()
    op = hesd.HessianOperator(model, CE, batches)
    op @ torch.randn(op.shape[0], dtype=torch.float64)
    assert model.training and model.bn.training


def test_parameters_changed_in_place_are_picked_up():
    model, batches, _ = make_case("mlp", seed=10)
    op = hesd.HessianOperator(model, CE, batches)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op @ v
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    H = hesd.exact_hessian(model, CE, batches)
    assert (op @ v - H @ v).abs().max() < 1e-10


def test_to_scipy_and_generator_data():
    model, batches, _ = make_case("mlp", seed=11)
    H = hesd.exact_hessian(model, CE, batches)
    op = hesd.HessianOperator(model, CE, (b for b in batches))  # one-shot iterator is materialised
    sop = op.to_scipy()
    x = np.random.default_rng(0).standard_normal(op.shape[0])
    assert np.abs(sop.matvec(x) - (H @ torch.from_numpy(x)).numpy()).max() < 1e-10
    X2 = np.random.default_rng(1).standard_normal((op.shape[0], 2))
    assert np.abs(sop.matmat(X2) - (H @ torch.from_numpy(X2)).numpy()).max() < 1e-10


def test_memory_budget_zero_still_exact():
    model, batches, _ = make_case("attention", seed=12)
    H = hesd.exact_hessian(model, CE, batches)
    op = hesd.HessianOperator(model, CE, batches, memory_budget=0)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert (op @ v - H @ v).abs().max() < 1e-10
    assert op.graph_bytes == 0


def test_float32_model_works():
    model, batches, _ = make_case("mlp", seed=13)
    model = model.float()
    batches32 = [(X.float(), y) for X, y in batches]
    op = hesd.HessianOperator(model, CE, batches32)
    assert op.dtype == torch.float32
    H = hesd.exact_hessian(model.double(), CE, batches)
    model.float()
    v = torch.randn(op.shape[0])
    assert (op @ v - (H @ v.double()).float()).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------- errors
def test_error_no_trainable_parameters():
    model = nn.Linear(3, 2).double().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hesd.HessianOperator(model, CE, (torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long)))


def test_error_empty_data():
    model = nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match="empty"):
        hesd.HessianOperator(model, CE, [])
    op = hesd.HessianOperator(model, CE, iter([]))
    with pytest.raises(ValueError, match="no samples"):
        op @ torch.randn(8, dtype=torch.float64)


def test_error_non_finite_loss():
    model = nn.Linear(3, 2).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    X[0, 0] = float("nan")
    op = hesd.HessianOperator(model, CE, (X, torch.zeros(4, dtype=torch.long)))
    with pytest.raises(NonFiniteLossError, match="nan on batch 0"):
        op @ torch.randn(8, dtype=torch.float64)


def test_error_non_scalar_loss():
    model = nn.Linear(3, 2).double()
    op = hesd.HessianOperator(
        model, lambda o, t: (o**2).sum(1), (torch.randn(4, 3, dtype=torch.float64), torch.zeros(4))
    )
    with pytest.raises(ValueError, match="scalar"):
        op @ torch.randn(8, dtype=torch.float64)


def test_error_reduction_none():
    with pytest.raises(ValueError, match="reduction='none'"):
        hesd.HessianOperator(
            nn.Linear(3, 2), nn.CrossEntropyLoss(reduction="none"), (torch.randn(4, 3), torch.zeros(4))
        )


def test_error_wrong_vector_size_and_dtype():
    model, batches, _ = make_case("mlp", seed=14)
    op = hesd.HessianOperator(model, CE, batches)
    P = op.shape[0]
    with pytest.raises(ValueError, match=rf"shape \({P},\)"):
        op @ torch.randn(P - 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype torch.float32"):
        op @ torch.randn(P)
    with pytest.raises(TypeError, match="torch.Tensor"):
        op @ np.ones(P)


def test_error_dropout_is_nondeterministic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    data = (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))
    with pytest.raises(ValueError, match="dropout"):
        hesd.HessianOperator(model, CE, data, model_mode="train")

    # Functional dropout bypasses the module check: caught by the determinism check.
    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(nn.functional.dropout(x, 0.5, training=True))

    op = hesd.HessianOperator(F().double(), CE, data)
    with pytest.raises(NonDeterministicError, match="dropout"):
        op @ torch.randn(op.shape[0], dtype=torch.float64)
    # In eval mode (default) dropout modules are off and products are deterministic.
    op = hesd.HessianOperator(model, CE, data)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert torch.equal(op @ v, op @ v)


def test_error_random_augmentation_is_caught():
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))

    class Augmented:
        def __iter__(self):
            for i in range(0, 12, 4):
                yield X[i : i + 4] + 0.1 * torch.randn(4, 4, generator=gen, dtype=torch.float64), y[i : i + 4]

    op = hesd.HessianOperator(nn.Linear(4, 3).double(), CE, Augmented())
    with pytest.raises(NonDeterministicError, match="augmentation"):
        op @ torch.randn(op.shape[0], dtype=torch.float64)


def test_error_bad_arguments():
    m = nn.Linear(2, 2)
    data = (torch.randn(3, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="model_mode"):
        hesd.HessianOperator(m, CE, data, model_mode="inference")
    with pytest.raises(ValueError, match="hvp_method"):
        hesd.HessianOperator(m, CE, data, hvp_method="magic")
    with pytest.raises(ValueError, match="no parameter named 'nope'"):
        hesd.HessianOperator(m, CE, data, params=["nope"])
    with pytest.raises(TypeError, match="nn.Module"):
        hesd.HessianOperator(lambda x: x, CE, data)
    with pytest.raises(TypeError, match="lone tensor"):
        hesd.HessianOperator(m, CE, torch.randn(3, 2))


def test_bfloat16_autocast_error_against_float64():
    model, batches, _ = make_case("attention", seed=15)
    H = hesd.exact_hessian(model, CE, batches)
    model32 = model.float()
    b32 = [(X.float(), y) for X, y in batches]
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0))
    ref = (H @ v.double()).float()
    exact32 = hesd.HessianOperator(model32, CE, b32) @ v
    mixed = hesd.HessianOperator(model32, CE, b32, autocast_dtype=torch.bfloat16) @ v
    err32 = float((exact32 - ref).norm() / ref.norm())
    err16 = float((mixed - ref).norm() / ref.norm())
    assert err32 < 1e-5
    assert 1e-5 < err16 < 0.1  # bf16 forward: percent-level error, measured here
    assert mixed.dtype == torch.float32


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_tf32_is_off_inside_products_and_settings_are_restored(allow_tf32):
    """Products run at full float32 precision unless allowed; the user's settings come back."""
    seen = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2).double()

        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()))
            return self.lin(x)

    before = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.set_float32_matmul_precision("high")  # what a training script might have set
    try:
        data = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
        op = hesd.HessianOperator(Probe(), CE, data, hvp_method="double_backward", allow_tf32=allow_tf32)
        op @ torch.randn(op.shape[0], dtype=torch.float64)
        # cuDNN's flag only matters on a GPU: on the CPU it is left as it was (tests/test_cuda.py checks the GPU).
        expected = (before[0], "high") if allow_tf32 else (before[0], "highest")
        assert seen and all(s == expected for s in seen)
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32 == before[0]
    finally:
        torch.set_float32_matmul_precision(before[1])


@pytest.mark.parametrize("method", ["double_backward", "graph", "func"])
def test_weighted_batches_multiply_views_of_the_vector_not_scaled_copies(monkeypatch, method):
    """Batches of unequal weight: every backward gets a view of V (the weight scales the result), and the
    product is still the dense Hessian's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    data = [(torch.randn(r, 5, dtype=torch.float64), torch.randint(0, 3, (r,))) for r in (4, 9, 2)]
    op = hesd.HessianOperator(model, CE, data, hvp_method=method, batch_columns=2 if method == "graph" else 1)
    V = torch.randn(op.shape[0], 2, dtype=torch.float64)
    seen: list[bool] = []
    inside = V.untyped_storage().data_ptr()
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, grad_outputs=None, **kw):
        if grad_outputs is not None and isinstance(grad_outputs, torch.Tensor) and grad_outputs.numel() >= V.shape[0]:
            seen.append(grad_outputs.untyped_storage().data_ptr() == inside)
        return real_grad(outputs, inputs, grad_outputs=grad_outputs, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    HV = op @ V
    monkeypatch.undo()
    H = hesd.exact_hessian(model, CE, data)  # checked against central differences above
    assert torch.allclose(HV, H @ V, rtol=0, atol=1e-10)
    if method != "func":  # forward-over-reverse takes no grad_outputs
        assert seen and all(seen), seen
