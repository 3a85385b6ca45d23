r"""Micro-batches: one batch's passes in pieces of at most ``max_tokens`` tokens, weighted exactly.

Activation memory, and for a language model the logits (tokens × vocabulary), grow with the
tokens a forward pass holds. With ``max_tokens`` (:class:`hesd.HessianOperator`) every batch
is cut along its rows into micro-batches of :math:`\lfloor \texttt{max\_tokens} / T
\rfloor` rows (at least one), :math:`T` its sequence length, and each micro-batch is a batch
of its own to the loss contract: counted (loss-bearing tokens, or samples) and weighted by its
count. Since the Hessian is that of the mean over every loss-bearing item,

.. math::  \sum_{m} \frac{n_m}{N} \nabla^2 \ell_m = \nabla^2 \frac{1}{N}\sum_{\text{items}} \ell

holds for any cut: the result is the same operator, to rounding (tested against the uncut one).

:math:`T` is the second dimension of the batch's token ids (``input_ids``, or the first integer
tensor of two or more dimensions); a batch without token ids counts one token per row, so
``max_tokens`` is then a number of rows. A sequence is never cut inside: a causal model needs its
whole prefix, so the smallest micro-batch is one row.

Rows must be independent: BatchNorm in training mode normalises over the rows of a batch, so
cutting would change the model; :func:`check_rows_independent` refuses that combination.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import HesdValueError

__all__ = ["check_rows_independent", "micro_batches", "num_rows", "sequence_length"]


def _tensors(x: Any) -> Iterator[tuple[str | None, torch.Tensor]]:
    if isinstance(x, torch.Tensor):
        yield None, x
    elif isinstance(x, Mapping):
        for k, v in x.items():
            for key, t in _tensors(v):
                yield (k if key is None else key), t
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)


def num_rows(raw: Any) -> int | None:
    """The batch's leading dimension (its first tensor's), or ``None`` when it holds no tensor."""
    for _, t in _tensors(raw):
        if t.dim() > 0:
            return int(t.shape[0])
    return None


def sequence_length(raw: Any) -> int:
    """Tokens per row: the second dimension of ``input_ids`` or of the first 2-D+ integer tensor; else 1."""
    found = list(_tensors(raw))
    for key, t in found:
        if key == "input_ids" and t.dim() >= 2:
            return int(t.shape[1])
    for _, t in found:
        if t.dim() >= 2 and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool:
            return int(t.shape[1])
    return 1


def _rows(x: Any, rows: int, sl: slice) -> Any:
    if isinstance(x, torch.Tensor):
        return x[sl] if x.dim() > 0 and x.shape[0] == rows else x
    if isinstance(x, Mapping):  # a dict, or transformers' BatchEncoding: a plain dict of the slices
        return {k: _rows(v, rows, sl) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_rows(v, rows, sl) for v in x)
    if isinstance(x, list):
        return [_rows(v, rows, sl) for v in x]
    return x


def micro_batches(raw: Any, max_tokens: int | None) -> Iterator[Any]:
    """``raw`` cut along its rows into pieces of at most ``max_tokens`` tokens (module docs).

    Every tensor whose leading dimension is the batch's row count is sliced; other values pass
    unchanged. ``max_tokens=None``, or a batch that fits, yields ``raw`` itself.

    Examples:
        >>> import torch
        >>> batch = {"input_ids": torch.arange(24).view(4, 6), "labels": torch.arange(24).view(4, 6)}
        >>> [tuple(b["input_ids"].shape) for b in micro_batches(batch, 13)]
        [(2, 6), (2, 6)]
    """
    rows = num_rows(raw)
    if max_tokens is None or rows is None:
        yield raw
        return
    per = max(1, max_tokens // sequence_length(raw))
    if per >= rows:
        yield raw
        return
    for start in range(0, rows, per):
        yield _rows(raw, rows, slice(start, min(start + per, rows)))


def check_rows_independent(model: nn.Module, model_mode: str, max_tokens: int | None, caller: str) -> None:
    """Refuse ``max_tokens`` where a batch's rows interact: BatchNorm in training mode.

    Raises:
        HesdValueError: ``max_tokens`` is not a positive integer, or rows interact.
    """
    if max_tokens is None:
        return
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise HesdValueError(f"{caller}: max_tokens must be a positive integer or None, got {max_tokens!r}")
    if model_mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise HesdValueError(
            f"{caller}: max_tokens cuts batches into micro-batches, but in model_mode='train' BatchNorm normalises "
            "over a batch's rows, so the cut would change the model; use model_mode='eval' or leave max_tokens=None"
        )
