"""Where PyTorch cannot take the derivatives a product needs, and what hesd says about it.

Two kinds of gap, found by the conformance suite (``tests/operators/test_conformance.py``)
and reported where they bite:

* **Batched second derivatives** (several columns through one pass, ``is_grads_batched`` or
  ``vmap``). A batched product that fails falls back to exact one-column products, once per
  operator, with one logged note (:func:`batching_note`) naming the layer types listed in
  :data:`BATCHING_GAPS`.
* **Derivatives at all.** Some operations have no second derivative (``ctc_loss``,
  ``multi_margin_loss``, ``embedding_bag`` with ``mode="max"``), others no forward-mode one
  (``grid_sample``; a float32 LSTM on oneDNN, which hesd avoids). :func:`derivative_gap` reads
  PyTorch's message; with ``hvp_method="auto"`` a model without a double backward moves to
  forward-over-reverse, one that neither exact method passes to finite differences
  (:func:`fall_back`), and when no method works :func:`unsupported` says which operation and
  what to do, as an :class:`hesd.errors.UnsupportedModelError`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import HesdError, UnsupportedModelError
from .finite_difference import expected_error

__all__ = ["BATCHING_GAPS", "DerivativeGap", "batching_note", "derivative_gap", "fall_back", "unsupported"]

logger = logging.getLogger("hesd")

#: Layer types whose second derivative has no working batching rule in PyTorch 2.13, with the cause.
BATCHING_GAPS: dict[type[nn.Module], str] = {
    nn.GroupNorm: (
        "aten::native_group_norm's double backward (infinitely_differentiable_native_group_norm_backward, taken "
        "once gradients reach its saved mean and rstd) fails under vmap when some of its incoming gradients are "
        "batched and others are not"
    ),
}


def batching_note(model: nn.Module, exc: BaseException, fallback: str = "columns") -> str:
    """The one note logged when batched products fail for ``model``.

    ``fallback`` says what the operator does instead: ``"func"`` (blocks through ``vmap`` of
    forward-over-reverse, which batches where the batched backward does not) or ``"columns"``
    (one column per pass).
    """
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, tuple(BATCHING_GAPS))})
    causes = sorted({BATCHING_GAPS[t] for t in BATCHING_GAPS if any(isinstance(m, t) for m in model.modules())})
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = (
        f"the model's {', '.join(kinds)} layers ({'; '.join(causes)})"
        if kinds
        else "an operation of this model (not one hesd knows about; please report it)"
    )
    instead = (
        "Blocks now go through vmap of forward-over-reverse (hvp_method='func'), which PyTorch can batch here"
        if fallback == "func"
        else "This operator now multiplies one column per pass: exact, and slower for many columns on a GPU "
        "(pass batch_columns=1 to skip the attempt)"
    )
    return f"hesd: batched double backward over several columns failed for {where}. PyTorch said: {first}. {instead}."


_GAPS = (
    (re.compile(r"derivative for '?(?P<op>[\w:.]+)'? is not implemented", re.IGNORECASE), "second"),
    (re.compile(r"(?P<op>cudnn RNN backward) can only be called in training mode", re.IGNORECASE), "second"),
    (re.compile(r"forward AD with (?P<op>[\w:.]+) that does not support it", re.IGNORECASE), "forward"),
    (re.compile(r"(?P<op>ZeroTensors are immutable)", re.IGNORECASE), "forward"),
)


@dataclass(frozen=True)
class DerivativeGap:
    """An operation PyTorch cannot differentiate the way a product method needs.

    Attributes:
        op: the operation PyTorch names.
        kind: ``"second"`` (no double backward: ``"graph"``/``"double_backward"`` products) or
            ``"forward"`` (no forward-mode derivative: ``"func"`` products).
        said: PyTorch's message, first line.
    """

    op: str
    kind: str
    said: str

    def describe(self) -> str:
        """One clause for a message."""
        if self.op.lower().startswith("zerotensors"):
            what = "a forward-mode derivative formula that writes into a zero tangent (a PyTorch bug)"
            return f"forward-over-reverse fails in {what}"
        if self.kind == "forward":
            return f"PyTorch has no forward-mode derivative for {self.op}, which forward-over-reverse needs"
        return f"PyTorch has no second derivative for {self.op}, which double backward needs"


def derivative_gap(exc: BaseException) -> DerivativeGap | None:
    """The :class:`DerivativeGap` behind ``exc``, or ``None`` when it is another kind of error."""
    text = str(exc)
    for pattern, kind in _GAPS:
        match = pattern.search(text)
        if match is not None:
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            return DerivativeGap(match.group("op"), kind, first)
    return None


def unsupported(gaps: list[DerivativeGap], hvp_method: str) -> UnsupportedModelError:
    """The error for a model whose Hessian-vector products PyTorch cannot take by the methods tried."""
    detail = "; ".join(f"{g.describe()} (PyTorch said: {g.said})" for g in gaps)
    tried = {g.kind for g in gaps}
    if tried == {"second", "forward"}:
        advice = (
            "Neither exact product method can pass through it: use hvp_method='finite_difference' (gradients "
            "only, about 1e-4 relative error in float32), restrict the Hessian to parameters that come after "
            "that operation (params=[...]) or replace it by a twice-differentiable equivalent"
        )
    elif tried == {"second"}:
        advice = (
            "Try hvp_method='func' (forward-over-reverse) or hvp_method='finite_difference' (gradients only), or "
            "restrict the Hessian to parameters after that operation (params=[...])"
        )
    else:
        advice = (
            "Use hvp_method='double_backward' (or 'auto'), hvp_method='finite_difference' (gradients only), or "
            "restrict the Hessian (params=[...])"
        )
    return UnsupportedModelError(
        f"HessianOperator(hvp_method={hvp_method!r}): Hessian-vector products cannot be taken for this model: "
        f"{detail}. {advice}"
    )


def fall_back(
    gap: DerivativeGap, methods: Sequence[str], run: Callable[[str], torch.Tensor], dtype: torch.dtype
) -> tuple[str, torch.Tensor]:
    """``hvp_method="auto"`` after ``gap``: the first of ``methods`` that runs, and its product.

    ``run(method)`` is the pass by ``method``. The switch is logged once, with the expected
    error of finite differences (:mod:`hesd.operators.finite_difference`).

    Raises:
        UnsupportedModelError: every method met a derivative gap.
    """
    gaps = [gap]
    for method in methods:
        try:
            out = run(method)
        except RuntimeError as again:
            other = None if isinstance(again, HesdError) else derivative_gap(again)
            if other is None:
                raise
            gaps.append(other)
            continue
        what = (
            "forward-over-reverse products (hvp_method='func')"
            if method == "func"
            else "finite-difference products (hvp_method='finite_difference', relative error about "
            f"{expected_error(dtype):.0e})"
        )
        logger.warning("hesd: %s; this operator uses %s from now on.", "; ".join(g.describe() for g in gaps), what)
        return method, out
    raise unsupported(gaps, "auto")
