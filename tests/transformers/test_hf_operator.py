"""The Hessian of a transformer's own token-level loss over all the data, against an independent reference.

The reference is written here from the logits alone: cross-entropy summed over every label token that is
not -100 (after the causal shift for causal LMs) of every batch, divided by their number — the loss the
model trains on over the concatenated data. Its products are double backward of that function, checked
against central differences of its gradient. hesd takes the model's own loss (``loss_fn=None``) batch by
batch; every product method must match the reference to ~1e-10 in float64, and a mean of per-batch means
(what ``lambda out, y: out.loss`` gave before) must not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesd
from hesd.operators.layout import ParameterLayout
from hesd.operators.rewrites import KeepFloat64
from hf_models import batches, tiny

FAMILIES = ["gpt2", "llama", "bert-mlm", "bert-cls", "bert-tok", "t5", "gpt2-lora"]
CAUSAL = {"gpt2", "llama", "gpt2-lora"}


def reference_loss(model, data, family, layout, theta):
    """Mean over all loss-bearing items of the data, from the logits (independent of hesd's contract)."""
    params = dict(zip(layout.names, layout.unflatten(theta), strict=True))
    total, count = 0.0, 0
    # RMSNorm casts to float32 (keep float64, as hesd does); SDPA's fused CPU kernel has no second derivative.
    with KeepFloat64(), sdpa_kernel(SDPBackend.MATH):
        for b in data:
            kwargs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            if family == "t5":  # the decoder's inputs are the labels shifted right; the loss is taken here
                kwargs["labels"] = b["labels"]
            out = functional_call(model, params, (), kwargs)
            logits, labels = out.logits, b["labels"]
            if family in CAUSAL:
                logits, labels = logits[:, :-1], labels[:, 1:]
            total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index=-100, reduction="sum")  # fmt: skip
            count += int((labels != -100).sum())
    return total / count, count


def reference_hvp(model, data, family, layout, v):
    theta = layout.vector().requires_grad_(True)
    loss, _ = reference_loss(model, data, family, layout, theta)
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    (hv,) = torch.autograd.grad(g @ v, theta)
    return hv


def reference_grad(model, data, family, layout, theta):
    theta = theta.detach().requires_grad_(True)
    loss, _ = reference_loss(model, data, family, layout, theta)
    return torch.autograd.grad(loss, theta)[0]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    family = request.param
    model = tiny(family).eval()
    data = batches(family)
    layout = ParameterLayout.select(model)
    return family, model, data, layout


def test_reference_matches_central_differences(case):
    family, model, data, layout = case
    v = torch.randn(layout.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    v /= v.norm()
    hv = reference_hvp(model, data, family, layout, v)
    eps = 1e-5
    theta = layout.vector()
    fd = (reference_grad(model, data, family, layout, theta + eps * v)
          - reference_grad(model, data, family, layout, theta - eps * v)) / (2 * eps)  # fmt: skip
    assert float((fd - hv).norm() / hv.norm()) < 1e-7


@pytest.mark.parametrize("method", ["graph", "double_backward", "func"])
def test_products_match_the_token_level_reference(case, method):
    family, model, data, layout = case
    V = torch.randn(layout.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    H = hesd.HessianOperator(model, None, data, hvp_method=method, batch_columns=2)
    ref = torch.stack([reference_hvp(model, data, family, layout, V[:, j]) for j in range(3)], dim=1)
    got = H @ V
    assert float((got - ref).norm() / ref.norm()) < 1e-10
    _, count = reference_loss(model, data, family, layout, layout.vector())
    assert H.num_samples == count
    assert H.loss() == pytest.approx(float(reference_loss(model, data, family, layout, layout.vector())[0]), rel=1e-12)
    assert H.param_names == layout.names


def test_a_mean_of_batch_means_fails_the_reference(case):
    family, model, data, layout = case
    v = torch.randn(layout.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    per_batch_mean = hesd.HessianOperator(model, hesd.ModelLoss(count=lambda batch: 1), data)
    ref = reference_hvp(model, data, family, layout, v)
    assert float((per_batch_mean @ v - ref).norm() / ref.norm()) > 1e-3


def test_lora_selects_only_the_adapter():
    model = tiny("gpt2-lora")
    H = hesd.HessianOperator(model, None, batches("gpt2"))
    assert H.param_names and all("lora_" in n for n in H.param_names)
    glob = hesd.HessianOperator(model, None, batches("gpt2"), params=["*lora_A*"])
    assert glob.param_names == [n for n in H.param_names if "lora_A" in n]


def test_causal_detection_and_counts():
    from hesd.operators.model_loss import is_causal_lm, label_count

    assert is_causal_lm(tiny("gpt2")) and is_causal_lm(tiny("llama")) and is_causal_lm(tiny("gpt2-lora"))
    assert not is_causal_lm(tiny("bert-mlm")) and not is_causal_lm(tiny("bert-cls"))
    labels = torch.tensor([[4, 5, -100, 6], [7, -100, -100, -100]])
    assert label_count(labels, causal=True) == 2 and label_count(labels, causal=False) == 4
    assert label_count(torch.randn(3, 2), causal=False) == 6  # regression / multi-label: every entry


def test_keep_float64_keeps_only_float64_to_float32_casts():
    x = torch.randn(3, dtype=torch.float64)
    with KeepFloat64():
        assert x.float().dtype == torch.float64 and x.to(torch.float32).dtype == torch.float64
        assert x.to(dtype=torch.float32).dtype == torch.float64
        assert x.to(torch.float16).dtype == torch.float16
        assert x.float().data_ptr() == x.data_ptr()
        y = torch.randn(3, dtype=torch.float16)
        assert y.float().dtype == torch.float32


def test_padding_rows_every_method_agrees_when_padding_reaches_the_loss():
    """Llama's embedding has padding_idx: with pad tokens attended and labelled, autograd gives the pad row
    no gradient; the Hessian is over the defined coordinates, so func agrees with double backward."""
    model = tiny("llama").eval()
    data = batches("llama")
    for b in data:  # pad tokens inside attended, labelled text
        b["input_ids"][:, 1] = 0
        b["attention_mask"][:, :2] = 1
        b["labels"][:, 1] = 0
    layout = ParameterLayout.select(model)
    assert layout.defined is not None and int((layout.defined == 0).sum()) == model.config.hidden_size
    V = torch.randn(layout.dim, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    out = {m: hesd.HessianOperator(model, None, data, hvp_method=m) @ V for m in ("graph", "func")}
    assert float((out["func"] - out["graph"]).norm() / out["graph"].norm()) < 1e-12
    H = hesd.exact_hessian(model, None, data)
    assert torch.allclose(H, H.T, atol=1e-12)
    pad = layout.defined == 0
    assert float(H[pad].abs().max()) == 0.0 and float(H[:, pad].abs().max()) == 0.0


def test_bfloat16_model_products_in_float32_close_to_float64(caplog):
    data = batches("gpt2")
    exact = hesd.eigenvalues(hesd.HessianOperator(tiny("gpt2"), None, data), k=1, which="LA", seed=0)
    with caplog.at_level("WARNING", logger="hesd"):
        H = hesd.HessianOperator(tiny("gpt2", torch.bfloat16), None, data)
    assert H.dtype == torch.float64 and H.layout.dtype == torch.bfloat16
    assert any("accumulated over the batches in float32" in r.message for r in caplog.records)
    low = hesd.eigenvalues(H, k=1, which="LA", seed=0)
    assert float(low.eigenvalues[0]) == pytest.approx(float(exact.eigenvalues[0]), rel=1e-2)
