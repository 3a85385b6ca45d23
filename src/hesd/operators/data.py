"""Data for curvature operators: batch parsing, counting, moving, and calling the model.

Every product method and the first-order pass read data through these functions, so a new
batch format is taught to hesd here (and a new way of turning a batch into a loss in
:mod:`hesd.operators.loss`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..errors import HesdTypeError, HesdValueError

__all__ = ["ModelCall", "as_reiterable", "batch_size", "call_model", "is_single_batch", "split_batch", "to_device"]

Batch = tuple[Any, Any]


def is_single_batch(data: Any) -> bool:
    """True when ``data`` is one ``(inputs, targets)`` pair rather than an iterable of them."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        inputs, targets = data
        return isinstance(targets, torch.Tensor) and isinstance(inputs, (torch.Tensor, dict, tuple, list))
    return False


def as_reiterable(data: Any, caller: str, *, allow_empty: bool = False) -> Iterable[Any]:
    """Return something that can be iterated over many times.

    A one-shot iterator (a generator, ``iter(loader)``) is materialised into a list,
    so each Hessian-vector product sees the same data. ``allow_empty``: a rank's shard under
    ``torch.distributed`` may hold no batch (more ranks than batches); the whole data set is
    checked for items after the all-reduce of the counts.

    Raises:
        HesdTypeError: ``data`` is a lone tensor or not iterable.
        HesdValueError: ``data`` has a length of zero.
    """
    if is_single_batch(data):
        return [tuple(data)]
    if isinstance(data, torch.Tensor):
        raise HesdTypeError(
            f"{caller}: data must be (inputs, targets) or an iterable of such batches, got a lone tensor"
        )
    try:
        iterator = iter(data)
    except TypeError:
        raise HesdTypeError(
            f"{caller}: data must be a DataLoader, an iterable of (inputs, targets) batches, "
            f"or one (inputs, targets) pair; got {type(data).__name__}"
        ) from None
    if iterator is data:
        return list(iterator)
    if not allow_empty and hasattr(data, "__len__") and len(data) == 0:
        raise HesdValueError(f"{caller}: data is empty (no batches); pass a non-empty DataLoader or batch list")
    return data


def split_batch(batch: Any, caller: str) -> Batch:
    """Split a batch into ``(inputs, targets)``.

    Raises:
        HesdTypeError: the batch is not a pair.
    """
    if isinstance(batch, Mapping):
        raise HesdTypeError(
            f"{caller}: a batch must be an (inputs, targets) pair for loss_fn(outputs, targets), got a dict with keys "
            f"{sorted(map(str, batch))}. For a model that computes its own loss (Hugging Face models with 'labels' "
            "in the batch) pass loss_fn=None (CLI: leave out --loss); for any other loss of a dict batch pass "
            "hesd.BatchLoss(fn) with fn(model, batch) -> loss"
        )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise HesdTypeError(
            f"{caller}: each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    return batch[0], batch[1]


def batch_size(inputs: Any, targets: Any) -> int:
    """Number of samples in a batch (leading dimension of the targets, else of the inputs).

    Raises:
        HesdTypeError: neither holds a tensor with a leading batch dimension.
    """
    if isinstance(targets, torch.Tensor) and targets.ndim > 0:
        return int(targets.shape[0])
    first = inputs
    while isinstance(first, (tuple, list)):
        first = first[0]
    if isinstance(first, Mapping):
        first = next(iter(first.values()))
    if isinstance(first, torch.Tensor) and first.ndim > 0:
        return int(first.shape[0])
    raise HesdTypeError("cannot tell the batch size: targets or inputs must be tensors with a leading batch dimension")


def to_device(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move tensors to ``device``; floating tensors are cast to the parameters' ``dtype``."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return x.to(device=device, dtype=dtype, non_blocking=True)
        return x.to(device=device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device, dtype) for v in x)
    return x


def call_model(model: nn.Module, inputs: Any, params: Mapping[str, torch.Tensor] | None = None) -> Any:
    """Call ``model`` on tensor, tuple (positional) or dict (keyword) inputs.

    With ``params`` the call is :func:`torch.func.functional_call`: those tensors stand in for
    the model's parameters of the same names (the forward-over-reverse product uses this).
    """
    if isinstance(inputs, Mapping):
        args: tuple[Any, ...] = ()
        kwargs = dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (inputs,), {}
    if params is None:
        return model(*args, **kwargs)
    return functional_call(model, dict(params), args, kwargs)


class ModelCall:
    """The model as a loss contract calls it: eagerly, or functionally with given parameter tensors.

    Calling it calls the model (under the forward context's autocast, float outputs cast back to
    the parameters' dtype); :meth:`on` calls it on a batch's inputs (tensor, tuple or dict);
    other attributes (``config``, submodules) are the model's. A user's
    ``fn(model, batch)`` (:class:`hesd.BatchLoss`) receives this, so that forward-over-reverse
    products can evaluate it with the parameters as tangents.

    Args:
        model: the network.
        params: tensors standing in for the model's parameters of the same names, or ``None``.
        autocast: a context factory entered around each call, or ``None``.
        dtype: with ``autocast``, the dtype a tensor output is cast back to.
    """

    def __init__(self, model: nn.Module, params: Mapping[str, torch.Tensor] | None = None, autocast: Any = None,
                 dtype: torch.dtype | None = None) -> None:  # fmt: skip
        self.model, self.params, self._autocast, self._dtype = model, params, autocast, dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output on these arguments."""
        if self._autocast is None:
            return self._call(args, kwargs)
        with self._autocast():
            out = self._call(args, kwargs)
        return out.to(self._dtype) if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.params is None:
            return self.model(*args, **kwargs)
        return functional_call(self.model, dict(self.params), args, kwargs)

    def on(self, inputs: Any) -> Any:
        """The model on a batch's inputs: a dict as keywords, a tuple positionally, else one argument."""
        if isinstance(inputs, Mapping):
            return self(**inputs)
        if isinstance(inputs, (tuple, list)):
            return self(*inputs)
        return self(inputs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)
