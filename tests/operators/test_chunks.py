"""Micro-batches (max_tokens): the same Hessian, with every forward pass holding at most max_tokens tokens."""

from __future__ import annotations

from collections import UserDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hesd
from helpers import make_case
from hesd.operators.chunks import micro_batches, sequence_length

METHODS = ["auto", "graph", "double_backward", "func", "finite_difference"]


def test_micro_batches_cut_rows_and_leave_the_rest():
    ids = torch.arange(30).view(5, 6)
    batch = {"input_ids": ids, "labels": ids.clone(), "scale": torch.tensor(2.0), "note": "x"}
    pieces = list(micro_batches(batch, 12))
    assert [p["input_ids"].shape[0] for p in pieces] == [2, 2, 1]
    assert torch.equal(torch.cat([p["labels"] for p in pieces]), ids)
    assert all(p["scale"] is batch["scale"] and p["note"] == "x" for p in pieces)
    assert [p["input_ids"].shape[0] for p in micro_batches(batch, 5)] == [1] * 5  # never inside a sequence
    assert next(iter(micro_batches(batch, 1000))) is batch and next(iter(micro_batches(batch, None))) is batch
    X, y = torch.randn(7, 3), torch.arange(7)
    assert [p[0].shape[0] for p in micro_batches((X, y), 3)] == [3, 3, 1]  # no token ids: rows
    assert sequence_length((X, y)) == 1 and sequence_length((ids, y)) == 6
    encoded = UserDict({"input_ids": ids, "attention_mask": torch.ones_like(ids)})  # like BatchEncoding
    assert [tuple(p["attention_mask"].shape) for p in micro_batches(encoded, 18)] == [(3, 6), (2, 6)]


@pytest.mark.parametrize("method", METHODS)
def test_cut_batches_give_the_same_operator_for_a_classifier(method):
    model, batches, _ = make_case("attention", seed=4)
    whole = hesd.HessianOperator(model, F.cross_entropy, batches, hvp_method=method)
    cut = hesd.HessianOperator(model, F.cross_entropy, batches, hvp_method=method, max_tokens=3)
    V = torch.randn(whole.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tol = 1e-9 if method == "finite_difference" else 1e-12
    ref = whole @ V
    assert (cut @ V - ref).abs().max() < tol * float(ref.abs().max())
    assert cut.loss() == pytest.approx(whole.loss(), rel=1e-14) and cut.num_samples == whole.num_samples
    assert torch.allclose(cut.gradient(), whole.gradient(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", ["auto", "double_backward", "finite_difference"])
def test_cut_token_batches_weight_every_token_exactly_and_bound_each_pass(method):
    """A causal LM's own loss over padded rows with -100 labels: micro-batches of one or two rows,
    each weighted by its own loss-bearing tokens, give the uncut operator; no pass holds more tokens."""
    pytest.importorskip("transformers")
    from hf_models import batches, tiny

    model = tiny("gpt2")
    data = batches("gpt2")
    whole = hesd.HessianOperator(model, None, data, hvp_method=method)
    cut = hesd.HessianOperator(model, None, data, hvp_method=method, max_tokens=14)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].numel()), with_kwargs=True)
    V = torch.randn(whole.shape[0], 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    HV = cut @ V
    hook.remove()
    ref = whole @ V
    tol = 1e-9 if method == "finite_difference" else 1e-12
    assert (HV - ref).abs().max() < tol * float(ref.abs().max())
    assert cut.num_samples == whole.num_samples and cut.loss() == pytest.approx(whole.loss(), rel=1e-13)
    assert seen and max(seen) <= 14 and max(b["input_ids"].numel() for b in data) > 14


def test_bad_max_tokens_and_coupled_rows_are_refused_up_front():
    model, batches, _ = make_case("mlp", seed=0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(hesd.HesdValueError, match="max_tokens must be a positive integer"):
            hesd.HessianOperator(model, F.cross_entropy, batches, max_tokens=bad)
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    with pytest.raises(hesd.HesdValueError, match="BatchNorm normalises over a batch's rows"):
        hesd.HessianOperator(bn, F.cross_entropy, batches, model_mode="train", max_tokens=4)
    hesd.HessianOperator(bn, F.cross_entropy, batches, model_mode="eval", max_tokens=4)  # eval: rows independent
