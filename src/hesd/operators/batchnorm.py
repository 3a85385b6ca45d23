r"""BatchNorm with running statistics, evaluated as the per-channel affine map it is.

In eval mode a BatchNorm layer computes

.. math::  y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta = x\, s + b, \qquad
    s = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \quad b = \beta - \mu s,

with the running mean :math:`\mu` and variance :math:`\sigma^2` fixed buffers. PyTorch's
``batch_norm`` kernel gives the same values, but its second derivative
(``NativeBatchNormBackwardBackward0``, the composite ``batchnorm_double_backward`` written for
batch statistics) is the general formula and expensive. Written as ``x * s + b``, the double
backward is the product rule of one multiplication and one addition, and the Hessian is the
same to rounding (tested in float64 against ``eval_batchnorm="native"``). What it buys is
measured by ``benchmarks/batchnorm.py`` (BENCHMARKS.md §4 and §5).

:class:`AffineEvalBatchNorm` is a :class:`torch.overrides.TorchFunctionMode`: inside it, every
call of :func:`torch.nn.functional.batch_norm` that uses running statistics (``training=False``)
is computed as the affine map; every other call (batch statistics, mixed dtypes as under
autocast) goes to PyTorch unchanged. The model itself is not modified.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["AffineEvalBatchNorm", "affine_eval_batchnorm", "has_running_stat_batchnorm"]


def _bn_args(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
):
    """The arguments of :func:`torch.nn.functional.batch_norm`, bound by position or keyword."""
    return input, running_mean, running_var, weight, bias, training, eps


class AffineEvalBatchNorm(TorchFunctionMode):
    """Evaluate running-statistics BatchNorm calls as ``x * s + b`` (module docs)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            x, mean, var, weight, bias, training, eps = _bn_args(*args, **kwargs)
            same_dtype = all(t is None or t.dtype == x.dtype for t in (mean, var, weight, bias))
            if not training and mean is not None and var is not None and x.dim() >= 2 and same_dtype:
                scale = torch.rsqrt(var + eps)
                if weight is not None:
                    scale = scale * weight
                shift = -mean * scale
                if bias is not None:
                    shift = shift + bias
                shape = (1, -1) + (1,) * (x.dim() - 2)
                return x * scale.reshape(shape) + shift.reshape(shape)
        return func(*args, **kwargs)


def has_running_stat_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer that uses running statistics in eval mode."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_var is not None
        for m in model.modules()
    )


def affine_eval_batchnorm(enabled: bool) -> Any:
    """:class:`AffineEvalBatchNorm` when ``enabled``, else a context that does nothing."""
    return AffineEvalBatchNorm() if enabled else nullcontext()
