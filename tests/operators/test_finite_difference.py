"""Finite-difference products (hvp_method="finite_difference"): exactness, restoring the parameters, and
the models where double backward cannot run. Their accuracy over every layer family is in
test_conformance.py."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesd
from hesd.operators.finite_difference import relative_step


def _mlp(seed: int = 0, act: type[nn.Module] = nn.Tanh, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), act(), nn.LayerNorm(6), nn.Linear(6, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.7)
    batches = [(torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)) for n in (7, 4)]
    return model, batches


def test_default_steps_follow_the_documented_rule():
    assert relative_step(torch.float64) == pytest.approx(0.75 * (2.0**-53) ** (1 / 3))
    assert relative_step(torch.float32) == pytest.approx(0.75 * (2.0**-24) ** (1 / 3))
    assert 3.5e-6 < relative_step(torch.float64) < 3.7e-6 and 2.8e-3 < relative_step(torch.float32) < 3e-3


def test_parameters_are_restored_bit_for_bit_and_the_prepared_state_stays_valid():
    model, batches = _mlp(1)
    before = [p.detach().clone() for p in model.parameters()]
    op = hesd.HessianOperator(model, F.cross_entropy, batches, hvp_method="finite_difference")
    H = hesd.exact_hessian(model, F.cross_entropy, batches)
    state = op._ensure_prepared()
    V = torch.randn(H.shape[0], 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    HV = op @ V
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert op._ensure_prepared() is state  # restored values: no second first-order pass
    assert op.graph_bytes == 0  # no graph is kept for gradients-only products
    assert (HV - H @ V).abs().max() < 2e-9 * float(H.abs().max())
    assert op.num_matvecs == 5


def test_parameters_are_restored_when_a_product_fails_midway():
    model, batches = _mlp(2)
    before = [p.detach().clone() for p in model.parameters()]
    calls = [0]

    def flaky(out, y):
        calls[0] += 1
        if calls[0] > 6:  # the first-order pass and its determinism check take 4 calls; fail inside the product
            raise RuntimeError("the loss failed on purpose")
        return F.cross_entropy(out, y)

    op = hesd.HessianOperator(model, flaky, batches, hvp_method="finite_difference")
    with pytest.raises(RuntimeError, match="on purpose"):
        op @ torch.randn(op.shape[0], 2, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_step_is_the_one_used_and_a_larger_step_costs_accuracy():
    model, batches = _mlp(3)
    H = hesd.exact_hessian(model, F.cross_entropy, batches)
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    errors = {}
    for rel in (None, 1e-3, 1e-2):
        op = hesd.HessianOperator(model, F.cross_entropy, batches, hvp_method="finite_difference", fd_step=rel)
        errors[rel] = float((op @ V - H @ V).abs().max() / H.abs().max())
    # Truncation error grows as the step squared (module docs): 100x from 1e-3 to 1e-2.
    assert errors[None] < 2e-9 < errors[1e-3] < errors[1e-2]
    assert 30 < errors[1e-2] / errors[1e-3] < 300


@pytest.mark.parametrize("bad", [0, 1, -1e-3, 2.0, "small", float("nan")])
def test_fd_step_is_checked_up_front(bad):
    model, batches = _mlp(0)
    with pytest.raises(hesd.HesdValueError, match="fd_step must be a relative step between 0 and 1"):
        hesd.HessianOperator(model, F.cross_entropy, batches, hvp_method="finite_difference", fd_step=bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_are_refused_before_any_work(dtype):
    model, batches = _mlp(0, dtype=dtype)
    with pytest.raises(hesd.HesdValueError, match=r"model\.float\(\)"):
        hesd.HessianOperator(model, F.cross_entropy, batches, hvp_method="finite_difference")


def test_float32_products_and_the_top_eigenvalue_match_float64_exact_ones():
    """A float32 model, finite differences at the default step: products to ~1e-4, λmax to ~1e-4."""
    model, batches = _mlp(5, act=nn.GELU)
    H = hesd.exact_hessian(model, F.cross_entropy, batches)
    exact_top = float(torch.linalg.eigvalsh(H)[-1])
    model32 = model.float()
    data32 = [(X.float(), y) for X, y in batches]
    op = hesd.HessianOperator(model32, F.cross_entropy, data32, hvp_method="finite_difference")
    V = torch.randn(H.shape[0], 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert float((op @ V.float()).double().sub(H @ V).abs().max() / H.abs().max()) < 1e-3
    top = hesd.eigenvalues(op, k=1, seed=0)
    assert abs(float(top.eigenvalues[0]) - exact_top) / abs(exact_top) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_piecewise_linear_layers_get_a_warning(dtype, caplog):
    model, batches = _mlp(0, act=nn.ReLU, dtype=dtype)
    with caplog.at_level(logging.WARNING, logger="hesd"):
        op = hesd.HessianOperator(model, F.cross_entropy, batches, hvp_method="finite_difference")
        op @ torch.randn(op.shape[0], dtype=dtype)
        op @ torch.randn(op.shape[0], dtype=dtype)
    notes = [r.getMessage() for r in caplog.records if "kink" in r.getMessage()]
    assert len(notes) == 1 and "ReLU" in notes[0] and "hvp_method='auto'" in notes[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hesd"):  # smooth layers: no warning
        hesd.HessianOperator(_mlp(0)[0], F.cross_entropy, batches, hvp_method="finite_difference")
    assert not [r for r in caplog.records if "kink" in r.getMessage()]


def test_auto_falls_back_to_finite_differences_when_no_exact_method_runs(caplog):
    """ctc_loss has neither a second derivative nor a forward-mode one: auto differences gradients, warns."""
    g = torch.Generator().manual_seed(6)
    T, N, C = 6, 3, 4
    torch.manual_seed(6)
    model = nn.Linear(3, C).double()
    data = (torch.randn(N, T, 3, generator=g, dtype=torch.float64), torch.randint(1, C, (N, 3), generator=g))

    def loss(out, y):
        return F.ctc_loss(out.log_softmax(-1).transpose(0, 1), y, [T] * len(y), [3] * len(y))

    params = list(model.parameters())
    flat = torch.nn.utils.parameters_to_vector(params).detach()

    def gradient(v):  # an independent reference: central differences, coordinate by coordinate
        torch.nn.utils.vector_to_parameters(v, params)
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss(model(data[0]), data[1]), params)])

    P = flat.numel()
    ref = torch.stack([(gradient(flat + 1e-5 * e) - gradient(flat - 1e-5 * e)) / 2e-5
                       for e in torch.eye(P, dtype=torch.float64)], dim=1)  # fmt: skip
    torch.nn.utils.vector_to_parameters(flat, params)
    op = hesd.HessianOperator(model, loss, data)
    V = torch.randn(P, 3, generator=g, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="hesd"):
        HV = op @ V
        op @ V[:, 0]
    assert (HV - ref @ V).abs().max() < 1e-6 * float(ref.abs().max())
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1, notes
    assert "_ctc_loss" in notes[0] and "finite-difference products" in notes[0] and "relative error" in notes[0]


def _gpt2(**config):
    tf = pytest.importorskip("transformers")

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=13, n_positions=16, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, **config)  # fmt: skip
    model = tf.GPT2LMHeadModel(cfg).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 13, (3, 9), generator=g)
    batches = [{"input_ids": ids[:2], "labels": ids[:2]}, {"input_ids": ids[2:], "labels": ids[2:]}]
    return model, batches


def test_transformer_keeps_its_attention_kernel_and_checkpointing_under_finite_differences(caplog):
    """Gradient checkpointing in train mode runs as the model has it, and the product is the exact one."""
    model, batches = _gpt2()
    exact = hesd.HessianOperator(model, None, batches, model_mode="train")
    V = torch.randn(exact.shape[0], 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = exact @ V
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seen = []
    block = model.transformer.h[0]
    hook = block.register_forward_pre_hook(lambda m, a: seen.append(bool(m.gradient_checkpointing and m.training)))
    op = hesd.HessianOperator(model, None, batches, model_mode="train", hvp_method="finite_difference")
    with caplog.at_level(logging.WARNING, logger="hesd"):
        HV = op @ V
    hook.remove()
    assert seen and all(seen)  # every forward pass, products included, ran checkpointed
    assert not [r for r in caplog.records if "checkpointing is off" in r.getMessage()]
    assert (HV - ref).norm() < 1e-8 * ref.norm()


def test_fsdp_operator_refuses_a_model_fsdp2_has_not_sharded():
    from hesd.operators.fsdp import FSDPHessianOperator

    model, batches = _mlp(0)
    with pytest.raises(hesd.HesdValueError, match="not sharded by FSDP2.*fully_shard"):
        FSDPHessianOperator(model, F.cross_entropy, batches)
