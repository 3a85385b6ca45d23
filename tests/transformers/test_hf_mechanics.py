"""Transformer mechanics handled for the user: attention kernels, checkpointing, cache, config dropout."""

from __future__ import annotations

import pytest
import torch

import hesd
from hf_models import batches, tiny


def _products(model, data, **kw):
    V = torch.randn(sum(p.numel() for p in model.parameters() if p.requires_grad), 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(7))  # fmt: skip
    return hesd.HessianOperator(model, None, data, **kw) @ V


def test_flex_attention_is_switched_for_products_and_restored(caplog):
    model, data = tiny("llama"), batches("llama")
    expected = _products(model, data)
    model.set_attn_implementation("flex_attention")
    with caplog.at_level("WARNING", logger="hesd"):
        got = _products(model, data)
    assert model.config._attn_implementation == "flex_attention"
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert sum("'flex_attention' has no second derivative" in r.message for r in caplog.records) == 1


def test_an_attention_that_cannot_switch_is_a_clear_error(monkeypatch):
    model, data = tiny("llama"), batches("llama")
    model.config._attn_implementation = "flash_attention_2"

    def refuse(*args, **kwargs):
        raise ImportError("flash_attn is not installed")

    monkeypatch.setattr(type(model), "set_attn_implementation", refuse)
    with pytest.raises(hesd.UnsupportedModelError, match="attn_implementation='sdpa' or 'eager'"):
        _products(model, data)


def test_gradient_checkpointing_off_during_products_in_train_mode_and_restored(caplog):
    model, data = tiny("gpt2"), batches("gpt2")
    expected = _products(model, data, model_mode="train")
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    with caplog.at_level("WARNING", logger="hesd"):
        got = _products(model, data, model_mode="train")
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert model.transformer.gradient_checkpointing is True and model.config.use_cache is True
    assert any("gradient checkpointing is off" in r.message for r in caplog.records)


def test_config_dropout_in_train_mode_is_named_by_the_determinism_check():
    model, data = tiny("llama"), batches("llama")
    model.config.attention_dropout = 0.5  # applied functionally in training mode: no nn.Dropout module
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5  # as from_pretrained(..., attention_dropout=0.5) sets it
    with pytest.raises(hesd.NonDeterministicError, match=r"attention_dropout=0.5.*model_mode='eval'"):
        _products(model, data, model_mode="train")
    _products(model, data)  # eval mode: no dropout, no error


def test_a_model_without_labels_in_the_batch_says_what_to_do():
    model = tiny("gpt2")
    with pytest.raises(hesd.HesdValueError, match="labels"):
        hesd.HessianOperator(model, None, [{"input_ids": batches("gpt2")[0]["input_ids"]}]).loss()


def test_dict_batch_with_a_pair_loss_names_the_fix():
    with pytest.raises(hesd.HesdTypeError, match="loss_fn=None"):
        hesd.HessianOperator(tiny("gpt2"), torch.nn.functional.cross_entropy, batches("gpt2")).loss()


def test_batch_loss_sum_count_and_auxiliary_terms():
    model, data = tiny("gpt2"), batches("gpt2")

    def summed(model, batch):
        out = model(**batch)
        n = int((batch["labels"][:, 1:] != -100).sum())
        return out.loss * n, n

    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    a = hesd.HessianOperator(model, hesd.BatchLoss(summed), data) @ V
    b = hesd.HessianOperator(model, None, data) @ V
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    f = hesd.HessianOperator(model, hesd.BatchLoss(summed), data, hvp_method="func") @ V
    assert torch.allclose(f, b, rtol=1e-10, atol=1e-12)
