r"""Losses evaluated by their elementwise definitions inside forward-over-reverse products.

Forward-over-reverse (``hvp_method="func"``, and ``vmap`` blocks chosen by ``"auto"``) needs
a forward-mode derivative of each loss's backward. In torch 2.13 three common losses lack a
working one (found by ``tests/operators/test_conformance.py``):

* ``mse_loss`` with ``reduction="mean"``: the forward derivative of ``mse_loss_backward``
  writes into the target's zero tangent ("ZeroTensors are immutable");
* ``huber_loss`` and ``soft_margin_loss``: "Trying to use forward AD with ..._backward that
  does not support it".

Inside :class:`FunctionalSafeLosses` (a :class:`torch.overrides.TorchFunctionMode`) these calls
are computed from their definitions,

.. math::

    \operatorname{mse}(x, y) = \operatorname{mean}\,(x - y)^2, \quad
    \operatorname{huber}_\delta(d) = \begin{cases} d^2/2 & |d| < \delta \\
    \delta (|d| - \delta/2) & \text{else} \end{cases}, \quad
    \operatorname{soft\_margin}(x, y) = \operatorname{mean} \log(1 + e^{-y x}),

which are the same functions (the same Hessian to rounding: tested against the double-backward
products). Calls with the deprecated ``size_average``/``reduce`` arguments or a ``weight`` go
to PyTorch unchanged. The model and the user's loss are not modified.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["FunctionalSafeLosses", "KeepFloat64"]


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    return x


def _mse(input: torch.Tensor, target: torch.Tensor, size_average: Any = None, reduce: Any = None,
         reduction: str = "mean", weight: Any = None) -> torch.Tensor | None:  # fmt: skip
    if size_average is not None or reduce is not None or weight is not None:
        return None
    return _reduce((input - target) ** 2, reduction)


def _huber(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean", delta: float = 1.0,
           weight: Any = None) -> torch.Tensor | None:  # fmt: skip
    if weight is not None:
        return None
    d = (input - target).abs()
    return _reduce(torch.where(d < delta, 0.5 * d**2, delta * (d - 0.5 * delta)), reduction)


def _soft_margin(input: torch.Tensor, target: torch.Tensor, size_average: Any = None, reduce: Any = None,
                 reduction: str = "mean") -> torch.Tensor | None:  # fmt: skip
    if size_average is not None or reduce is not None:
        return None
    return _reduce(F.softplus(-target * input), reduction)


_DEFINITIONS: dict[Any, Callable[..., torch.Tensor | None]] = {
    F.mse_loss: _mse,
    F.huber_loss: _huber,
    F.soft_margin_loss: _soft_margin,
}


class FunctionalSafeLosses(TorchFunctionMode):
    """Evaluate ``mse_loss``, ``huber_loss`` and ``soft_margin_loss`` by their definitions (module docs)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        definition = _DEFINITIONS.get(func)
        if definition is not None:
            result = definition(*args, **kwargs)
            if result is not None:
                return result
        return func(*args, **kwargs)


class KeepFloat64(TorchFunctionMode):
    """Casts of a float64 tensor to float32 leave it in float64 inside the block.

    Code written for half-precision training upcasts with ``.float()`` or ``.to(torch.float32)``
    — Hugging Face's ``ForCausalLMLoss`` does ``logits = logits.float()``, Llama's RMSNorm
    ``hidden_states.to(torch.float32)`` — which *rounds* a float64 model's activations to
    float32 and would cap a float64 analysis at float32 accuracy (products then differ by about
    1e-8 between methods). hesd enters this mode when the parameters are float64, so the model
    keeps their precision; for float32 and lower nothing changes. Only casts that change
    nothing but the dtype (``x.float()``, ``x.to(torch.float32)``, ``x.to(dtype=torch.float32)``,
    ``x.type(torch.float32)``) are kept.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64:
            if func is torch.Tensor.float and len(args) == 1 and not kwargs:
                return args[0]
            if func in (torch.Tensor.to, torch.Tensor.type) and _only_float32(args[1:], kwargs):
                return args[0]
        return func(*args, **kwargs)


def _only_float32(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``.to``/``.type`` arguments ask for float32 and nothing else."""
    if args == (torch.float32,) and not kwargs:
        return True
    return not args and set(kwargs) == {"dtype"} and kwargs["dtype"] is torch.float32
