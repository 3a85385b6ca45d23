"""Where PyTorch cannot take the derivatives a product needs, and what hesd says about it.

Two kinds of gap, found by the conformance suite (``tests/operators/test_conformance.py``)
and reported where they bite:

* **Batched second derivatives** (several columns through one pass, ``is_grads_batched`` or
  ``vmap``). A batched product that fails falls back to exact one-column products, once per
  operator, with one logged note (:func:`batching_note`) naming the layer types listed in
  :data:`BATCHING_GAPS`.
* **Second derivatives at all.** :func:`explain` turns PyTorch's message into an
  :class:`hesd.errors.UnsupportedModelError` naming the operation and what to do.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import UnsupportedModelError

__all__ = ["BATCHING_GAPS", "batching_note", "explain"]

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


_NO_DERIVATIVE = re.compile(
    r"derivative for (?P<op>[\w:.']+) is not implemented|(?P<op2>[\w:.]+) (?:is|are) not differentiable"
    r"|(?P<op3>cudnn RNN backward) can only be called in training mode"
    r"|forward AD with (?P<op4>[\w:.]+) that does not support it"
    r"|(?P<op5>ZeroTensors are immutable)",
    re.IGNORECASE,
)


def explain(exc: BaseException, hvp_method: str) -> UnsupportedModelError | None:
    """An :class:`~hesd.errors.UnsupportedModelError` for a failed second derivative, or ``None``.

    ``None`` when the message is not one of PyTorch's "no derivative" messages: the caller
    re-raises the original error.
    """
    match = _NO_DERIVATIVE.search(str(exc))
    if match is None:
        return None
    op = next((g for g in match.groups() if g), "an operation").strip("'")
    if op.lower().startswith("zerotensors"):
        op = "a forward-mode derivative formula that writes into a zero tangent (a PyTorch bug)"
    other = "hvp_method='func'" if hvp_method != "func" else "hvp_method='double_backward'"
    return UnsupportedModelError(
        f"HessianOperator: PyTorch cannot take the second derivative through {op} (it said: "
        f"{str(exc).strip().splitlines()[0]}). Hessian-vector products need it. Try {other}; or restrict the "
        "Hessian to parameters before that operation (params=[...]); or replace the layer by a twice-"
        "differentiable equivalent (a fused attention or RNN kernel by its math form)"
    )
