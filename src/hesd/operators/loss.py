r"""The loss contract: how a batch becomes a loss, and how much each batch weighs.

hesd takes the Hessian of the loss the model trains on over *all* the data: the mean over
every loss-bearing item, never a mean of per-batch means. A contract says, for one batch,
which items bear the loss (``count``) and what the batch's loss is, so that with
:math:`N = \sum_b n_b` items in all

.. math::

    L(\theta) = \sum_b w_b\, \ell_b(\theta), \qquad
    w_b = \begin{cases} n_b / N & \ell_b \text{ a mean over its } n_b \text{ items} \\
                       1 / N & \ell_b \text{ a sum} \end{cases}

Every part of the operator layer (the first-order pass, each product method, the determinism
check) reads batches only through a contract, so a new kind of loss is one class here.

:class:`PairLoss` is the contract of ``loss_fn(model(inputs), targets)`` over
``(inputs, targets)`` batches, with one item per sample; :mod:`hesd.operators.model_loss` has
the model's own loss (Hugging Face models, token-level counts) and ``fn(model, batch)``.

Examples:
    >>> import torch
    >>> from hesd.operators.loss import PairLoss
    >>> contract = PairLoss(torch.nn.functional.mse_loss)
    >>> batch = contract.prepare((torch.randn(5, 2), torch.randn(5, 1)), torch.device("cpu"), torch.float32)
    >>> batch.count, contract.weight(batch.count, total=20.0)
    (5, 0.25)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import HesdTypeError, HesdValueError
from .data import ModelCall, batch_size, split_batch, to_device
from .rewrites import FunctionalSafeLosses

__all__ = ["LossBatch", "LossContract", "PairLoss"]


@dataclass
class LossBatch:
    """One batch as the operator uses it: on the parameters' device, with its item count.

    Attributes:
        inputs: what the model is called on (a tensor, a tuple of positional arguments or a
            dict of keyword arguments).
        targets: what the loss compares the outputs with (``None`` when the model computes
            its own loss).
        count: loss-bearing items in the batch (samples; tokens for a token-level loss).
    """

    inputs: Any
    targets: Any
    count: int


class LossContract:
    """Base class of loss contracts (module docs). Subclasses implement the three methods."""

    #: the callable users gave, for messages and fingerprints
    loss_fn: Any = None

    def prepare(self, raw: Any, device: torch.device, dtype: torch.dtype) -> LossBatch | None:  # pragma: no cover
        """The batch ``raw`` as the data yields it, moved to ``device``; ``None`` if it holds no item."""
        raise NotImplementedError

    def bind(self, model: nn.Module) -> None:
        """Learn what the contract needs of ``model`` (e.g. whether a language model is causal)."""

    def loss(self, model: ModelCall, batch: LossBatch, functional: bool = False) -> torch.Tensor:  # pragma: no cover
        """The batch's loss; ``model`` calls the network (eagerly or in its functional form).

        ``functional``: the loss is taken inside forward-over-reverse; losses whose forward-mode
        derivative PyTorch lacks must then be evaluated by their definitions
        (:class:`~hesd.operators.rewrites.FunctionalSafeLosses`, around the loss alone).
        """
        raise NotImplementedError

    def weight(self, count: int, total: float) -> float:  # pragma: no cover
        r"""The batch's weight :math:`w_b` in the loss over all ``total`` items.

        Must have the form :math:`c(\text{count}) / \text{total}` (``count / total`` for a mean
        loss, ``1 / total`` for a summed one): the first-order pass sums :math:`c(n_b)\, g_b`
        as it goes and divides by the total once it is known.
        """
        raise NotImplementedError


class PairLoss(LossContract):
    """``loss_fn(model(inputs), targets)`` on ``(inputs, targets)`` batches, one item per sample.

    Args:
        loss_fn: returns the batch's mean loss (``reduction="mean"``); a loss object whose
            ``reduction`` attribute is ``"sum"`` returns the sum and is weighted by :math:`1/N`.
        caller: the public function's name, for messages.

    Raises:
        HesdTypeError: ``loss_fn`` is not callable.
        HesdValueError: ``loss_fn`` has ``reduction="none"`` (or another value than mean/sum).
    """

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor], caller: str = "HessianOperator") -> None:
        if not callable(loss_fn):
            raise HesdTypeError(f"{caller}: loss_fn must be callable, got {type(loss_fn).__name__}")
        reduction = getattr(loss_fn, "reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise HesdValueError(f"{caller}: loss_fn has reduction={reduction!r}; use 'mean' (or 'sum')")
        self.loss_fn = loss_fn
        self.caller = caller
        self.sum_reduction = reduction == "sum"

    def prepare(self, raw: Any, device: torch.device, dtype: torch.dtype) -> LossBatch | None:
        """Split ``raw`` into ``(inputs, targets)``, count its samples and move it to ``device``."""
        inputs, targets = split_batch(raw, self.caller)
        n = batch_size(inputs, targets)
        if n == 0:
            return None
        return LossBatch(to_device(inputs, device, dtype), to_device(targets, device, dtype), n)

    def loss(self, model: ModelCall, batch: LossBatch, functional: bool = False) -> torch.Tensor:
        """``loss_fn(model(inputs), targets)``."""
        outputs = model.on(batch.inputs)
        if not functional:
            return self.loss_fn(outputs, batch.targets)
        with FunctionalSafeLosses():  # around the loss only: a mode costs every call it sees
            return self.loss_fn(outputs, batch.targets)

    def weight(self, count: int, total: float) -> float:
        """``count / total`` for a mean loss, ``1 / total`` for a summed one."""
        return (1.0 if self.sum_reduction else float(count)) / total
