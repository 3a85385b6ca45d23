"""Data handling for curvature operators: one place for batch parsing, counting and moving."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

Batch = tuple[Any, Any]


def is_single_batch(data: Any) -> bool:
    """True when ``data`` is one ``(inputs, targets)`` pair rather than an iterable of them."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        inputs, targets = data
        return isinstance(targets, torch.Tensor) and isinstance(inputs, (torch.Tensor, dict, tuple, list))
    return False


def as_reiterable(data: Any, caller: str) -> Iterable[Batch]:
    """Return something that can be iterated over many times.

    A one-shot iterator (a generator, ``iter(loader)``) is materialised into a list,
    so each Hessian-vector product sees the same data.
    """
    if is_single_batch(data):
        return [tuple(data)]
    if isinstance(data, torch.Tensor):
        raise TypeError(f"{caller}: data must be (inputs, targets) or an iterable of such batches, got a lone tensor")
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(
            f"{caller}: data must be a DataLoader, an iterable of (inputs, targets) batches, "
            f"or one (inputs, targets) pair; got {type(data).__name__}"
        ) from None
    if iterator is data:
        return list(iterator)
    if hasattr(data, "__len__") and len(data) == 0:
        raise ValueError(f"{caller}: data is empty (no batches); pass a non-empty DataLoader or batch list")
    return data


def split_batch(batch: Any, caller: str) -> Batch:
    """Split a batch into ``(inputs, targets)``."""
    if isinstance(batch, dict):
        raise TypeError(
            f"{caller}: a batch must be an (inputs, targets) pair, got a dict; wrap it as (inputs, targets)"
        )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"{caller}: each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    return batch[0], batch[1]


def batch_size(inputs: Any, targets: Any) -> int:
    """Number of samples in a batch (leading dimension of the targets, else of the inputs)."""
    if isinstance(targets, torch.Tensor) and targets.ndim > 0:
        return int(targets.shape[0])
    first = inputs
    while isinstance(first, (tuple, list)):
        first = first[0]
    if isinstance(first, dict):
        first = next(iter(first.values()))
    if isinstance(first, torch.Tensor) and first.ndim > 0:
        return int(first.shape[0])
    raise TypeError("cannot tell the batch size: targets or inputs must be tensors with a leading batch dimension")


def to_device(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move tensors to ``device``; floating tensors are cast to the parameters' ``dtype``."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return x.to(device=device, dtype=dtype, non_blocking=True)
        return x.to(device=device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device, dtype) for v in x)
    return x


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on tensor, tuple (positional) or dict (keyword) inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
