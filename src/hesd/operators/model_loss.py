r"""Loss contracts for models that compute their own loss, and for any ``fn(model, batch)``.

:class:`ModelLoss` (``loss_fn=None``) is the loss the model trains on when it computes it itself,
as every Hugging Face ``transformers`` head does when the batch holds ``labels``: a dict batch
is passed as keyword arguments (a tuple positionally) and the loss is read from the output
(``outputs.loss``, ``outputs["loss"]``, the first element of a tuple, or a scalar return).

Such a loss is a mean over the batch's *loss-bearing items* — for token losses the label
tokens that are not ``-100`` — so the batch's weight is its item count :math:`n_b` over the
total :math:`N` (:mod:`hesd.operators.loss`), and the Hessian is that of the mean over every
loss-bearing token of the data set, not a mean of per-batch means. The count is derived from
``labels`` as the heads of ``transformers`` count them (:func:`label_count`):

* causal language models (``*ForCausalLM``, ``*LMHeadModel``) shift the labels by one:
  :math:`n_b = \#\{(i, t) : t \ge 1,\ y_{i,t} \ne -100\}` (the count the ``Trainer`` passes as
  ``num_items_in_batch``);
* masked LM, token classification, seq2seq and single-label sequence classification: the
  integer labels that are not ``-100``;
* float labels (regression, multi-label): every entry (``MSELoss``/``BCEWithLogitsLoss`` take
  the mean over all of them);
* no ``labels``: the batch's leading dimension (samples).

A pair ``(inputs_dict, labels)`` is taken as ``{**inputs_dict, "labels": labels}``.

``ModelLoss(count=fn)`` overrides the count, ``ModelLoss(causal=...)`` the detection.
:class:`BatchLoss` is everything else: ``fn(model, batch)`` returning the batch-mean loss (its
items counted as above or by ``count``), or ``(sum, count)``.

Examples:
    >>> import torch
    >>> from hesd.operators.model_loss import label_count
    >>> labels = torch.tensor([[5, 6, -100], [7, -100, -100]])
    >>> label_count(labels, causal=True), label_count(labels, causal=False)
    (1, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import HesdTypeError, HesdValueError
from .data import ModelCall, batch_size, to_device
from .loss import LossBatch, LossContract, PairLoss
from .rewrites import FunctionalSafeLosses

__all__ = ["BatchLoss", "ModelLoss", "is_causal_lm", "label_count", "loss_contract", "model_output_loss"]

#: the label value Hugging Face losses (and ``F.cross_entropy``) ignore
IGNORE_INDEX = -100

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` (or the model a PEFT wrapper holds) is a causal language model of ``transformers``.

    Decided by the class name (``*ForCausalLM``, ``*LMHeadModel``) of a decoder-only model
    (``config.is_encoder_decoder`` false); a PEFT model is unwrapped with ``get_base_model()``.
    """
    base = model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
    config = getattr(base, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        return False
    return type(base).__name__.endswith(_CAUSAL_SUFFIXES)


def label_count(labels: Any, causal: bool) -> int:
    """Loss-bearing items of ``labels`` as ``transformers``' heads count them (module docs)."""
    if not isinstance(labels, torch.Tensor):
        raise HesdTypeError(f"the batch's 'labels' must be a tensor, got {type(labels).__name__}")
    if labels.is_floating_point():
        return int(labels.numel())
    if causal:
        if labels.ndim < 2:
            raise HesdValueError(
                f"a causal language model needs token labels of shape (batch, length), got {tuple(labels.shape)}"
            )
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def model_output_loss(out: Any, caller: str) -> torch.Tensor:
    """The loss in a model's output: ``.loss``, ``["loss"]``, a tuple's first element or a scalar.

    Raises:
        HesdValueError: the output holds no loss.
    """
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        return out
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        loss = out[0] if out[0].numel() == 1 else None
    if not isinstance(loss, torch.Tensor):
        raise HesdValueError(
            f"{caller}: loss_fn=None uses the loss the model computes, but the model returned "
            f"{type(out).__name__} without one. Hugging Face models compute their loss only when the batch holds "
            "'labels' (for a causal LM, labels = input_ids with padding set to -100); or pass a loss_fn"
        )
    return loss


def _positional(raw: Any) -> Any:
    return dict(raw) if isinstance(raw, Mapping) else (tuple(raw) if isinstance(raw, (tuple, list)) else raw)


class ModelLoss(LossContract):
    """The loss the model computes itself, weighted by its loss-bearing items (module docs).

    Args:
        count: ``count(batch) -> int``, the batch's loss-bearing items (default: from ``labels``).
        causal: whether the labels are shifted by one inside the model (default: detected,
            :func:`is_causal_lm`).
        caller: the public function's name, for messages.

    Examples:
        >>> import torch, hesd
        >>> class Net(torch.nn.Module):  # a model that returns its own loss
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(3, 2)
        ...     def forward(self, x, labels):
        ...         return {"loss": torch.nn.functional.cross_entropy(self.lin(x), labels)}
        >>> batches = [{"x": torch.randn(4, 3), "labels": torch.randint(0, 2, (4,))} for _ in range(2)]
        >>> H = hesd.HessianOperator(Net(), None, batches)
        >>> H.shape, H.num_samples
        ((8, 8), 8)
    """

    def __init__(self, count: Callable[[Any], int] | None = None, causal: bool | None = None,
                 caller: str = "HessianOperator") -> None:  # fmt: skip
        if count is not None and not callable(count):
            raise HesdTypeError(f"{caller}: ModelLoss(count=...) must be callable, got {type(count).__name__}")
        self.count, self.causal, self.caller = count, causal, caller
        self.loss_fn = None

    def bind(self, model: nn.Module) -> None:
        """Detect a causal language model unless ``causal`` was given."""
        if self.causal is None:
            self.causal = is_causal_lm(model)

    def items(self, raw: Any) -> int:
        """Loss-bearing items of a raw batch (``count``, else from ``labels``, else samples)."""
        if self.count is not None:
            n = self.count(raw)
            if isinstance(n, torch.Tensor):
                n = int(n)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise HesdValueError(f"{self.caller}: count(batch) must return a non-negative int, got {n!r}")
            return n
        if isinstance(raw, Mapping) and "labels" in raw:
            return label_count(raw["labels"], bool(self.causal))
        return batch_size(raw, None)

    def prepare(self, raw: Any, device: torch.device, dtype: torch.dtype) -> LossBatch | None:
        """The batch as the model's arguments, on ``device``, with its item count; ``None`` if it has none."""
        if not isinstance(raw, (Mapping, tuple, list, torch.Tensor)):
            raise HesdTypeError(
                f"{self.caller}: with loss_fn=None each batch is the model's arguments (a dict of keyword "
                f"arguments, a tuple of positional ones, or a tensor), got {type(raw).__name__}"
            )
        if isinstance(raw, (tuple, list)) and len(raw) == 2 and isinstance(raw[0], Mapping) and "labels" not in raw[0]:
            raw = {**raw[0], "labels": raw[1]}  # (inputs, labels), as classification data often comes
        n = self.items(raw)
        if n == 0:
            return None
        return LossBatch(to_device(_positional(raw), device, dtype), None, n)

    def loss(self, model: ModelCall, batch: LossBatch, functional: bool = False) -> torch.Tensor:
        """The model's own loss on the batch (module docs)."""
        if not functional:
            return model_output_loss(model.on(batch.inputs), self.caller)
        with FunctionalSafeLosses():  # the loss is inside the model: the mode sees the whole forward
            return model_output_loss(model.on(batch.inputs), self.caller)

    def weight(self, count: int, total: float) -> float:
        """``count / total``: the model's loss is a mean over the batch's items."""
        return float(count) / total


class BatchLoss(LossContract):
    """``fn(model, batch)``: any loss of a batch, for multi-input models, dict outputs, auxiliary losses.

    ``fn`` returns the batch's mean loss over its loss-bearing items — counted by ``count``, or
    as :class:`ModelLoss` counts them — or a pair ``(sum, count)``, the sum over the batch's
    items and their number (weighted :math:`1/N` then). Call the model as ``model(...)``: in
    forward-over-reverse products ``model`` is a stand-in that evaluates the network with the
    parameters as tangents (:class:`~hesd.operators.data.ModelCall`; its attributes are the
    network's).

    Args:
        fn: ``fn(model, batch) -> loss`` or ``(sum, count)``.
        count: ``count(batch) -> int`` for mean losses (default: from ``labels``, else samples).
        causal: as for :class:`ModelLoss`, for counting ``labels``.

    Raises:
        HesdTypeError: ``fn`` is not callable.

    Examples:
        >>> import torch, hesd
        >>> model = torch.nn.Linear(3, 1)
        >>> def fn(model, batch):
        ...     return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]) + 1e-3 * model.weight.pow(2).sum()
        >>> H = hesd.HessianOperator(model, hesd.BatchLoss(fn), [{"x": torch.randn(5, 3), "y": torch.randn(5, 1)}])
        >>> H.shape
        (4, 4)
    """

    def __init__(self, fn: Callable[[Any, Any], Any], count: Callable[[Any], int] | None = None,
                 causal: bool | None = None) -> None:  # fmt: skip
        if not callable(fn):
            raise HesdTypeError(f"BatchLoss: fn must be callable, got {type(fn).__name__}")
        self.fn = self.loss_fn = fn
        self.counter = ModelLoss(count, causal, caller="BatchLoss")
        self.summed: bool | None = None  # learnt from the first batch: fn returns (sum, count)

    def bind(self, model: nn.Module) -> None:
        """As :meth:`ModelLoss.bind`."""
        self.counter.bind(model)

    def prepare(self, raw: Any, device: torch.device, dtype: torch.dtype) -> LossBatch | None:
        """The whole batch on ``device``, counted (``(sum, count)`` losses: their count replaces it)."""
        n = self.counter.items(raw)
        if n == 0 and self.summed is not True:
            return None
        return LossBatch(to_device(_positional(raw), device, dtype), None, n)

    def loss(self, model: ModelCall, batch: LossBatch, functional: bool = False) -> torch.Tensor:
        """``fn(model, batch)``; a ``(sum, count)`` return sets the batch's count and returns the sum."""
        if functional:
            with FunctionalSafeLosses():
                out = self.fn(model, batch.inputs)
        else:
            out = self.fn(model, batch.inputs)
        summed = isinstance(out, (tuple, list))
        if self.summed is not None and summed != self.summed:
            raise HesdValueError("BatchLoss: fn returned (sum, count) for some batches and a mean for others")
        self.summed = summed
        if not summed:
            return out
        if len(out) != 2:
            raise HesdValueError(f"BatchLoss: fn must return a loss or (sum, count), got a sequence of {len(out)}")
        total, n = out
        batch.count = int(n)
        return total

    def weight(self, count: int, total: float) -> float:
        """``count / total`` for a mean, ``1 / total`` for a ``(sum, count)`` loss."""
        return (1.0 if self.summed else float(count)) / total


def loss_contract(loss_fn: Any, caller: str = "HessianOperator") -> LossContract:
    """The contract for what a user passed as the loss.

    ``None`` → :class:`ModelLoss`; a contract (:class:`BatchLoss`, :class:`ModelLoss`) as is; a
    callable → :class:`~hesd.operators.loss.PairLoss`.
    """
    if loss_fn is None:
        return ModelLoss(caller=caller)
    if isinstance(loss_fn, LossContract):
        return loss_fn
    return PairLoss(loss_fn, caller)


def mean_loss(
    model: nn.Module, contract: LossContract, data: Any, device: torch.device, dtype: torch.dtype,
    params: dict[str, torch.Tensor] | None = None,
) -> tuple[float, int]:  # fmt: skip
    r"""``(L, N)``: the loss over all loss-bearing items of ``data`` and their number, without gradients.

    :math:`L = \sum_b w_b \ell_b` with the contract's weights (:mod:`hesd.operators.loss`), the same
    loss the operator takes the Hessian of; ``params`` evaluates the model at other values.
    Call it in the state the model should run in (e.g. :func:`hesd.operators.model_state`).
    """
    loss = 0.0
    prepared = [b for b in (contract.prepare(raw, device, dtype) for raw in data) if b is not None]
    with torch.no_grad():
        values = [(b, float(contract.loss(ModelCall(model, params), b))) for b in prepared]
    total = sum(b.count for b, _ in values)
    for b, value in values:
        loss += contract.weight(b.count, float(max(total, 1))) * value
    return loss, total
