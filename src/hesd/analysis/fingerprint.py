"""Fingerprints of what defines a results row besides the settings: data, loss, model, parameters.

A results folder stores these with the settings (:class:`~hesd.analysis.store.ResultStore`),
and a later run into the same folder with other inputs is refused with a message naming what
changed, instead of resuming into a table that mixes them. Each checkpoint's own bytes are
fingerprinted per row (``sha256``).

* **data** — SHA-256 over every batch's tensors (names, dtypes, shapes, bytes) and other
  leaves, the batches' digests sorted, so the same batches in another order (a fixed loader
  read by another code path) are the same data. A shuffling loader forms other batches each
  run and so gives another fingerprint: pass a fixed loader (hesd's products need one anyway).
  Under data parallelism the fingerprint is rank 0's shard.
* **loss** — the loss function's module and qualified name, with the simple attributes of a
  loss object (``reduction``, ``label_smoothing`` …); ``"model's own loss"`` for ``None``.
* **model** — the names, shapes and dtypes of the model's parameters and buffers (the
  architecture, not the weights), or ``"from each checkpoint folder"`` for Hugging Face folders,
  whose ``config.json`` is part of each checkpoint's hash.

Examples:
    >>> import torch
    >>> from hesd.analysis.fingerprint import data_fingerprint
    >>> a = [(torch.ones(2, 3), torch.zeros(2)), (torch.ones(1, 3), torch.ones(1))]
    >>> data_fingerprint(a) == data_fingerprint(a[::-1]), data_fingerprint(a) == data_fingerprint(a[:1])
    (True, False)
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["callable_name", "data_fingerprint", "inputs_fingerprint", "model_fingerprint"]


def _feed(h: Any, x: Any) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(x, Mapping):
        h.update(b"{")
        for k in sorted(x, key=str):
            h.update(str(k).encode() + b":")
            _feed(h, x[k])
        h.update(b"}")
    elif isinstance(x, (tuple, list)):
        h.update(b"(")
        for v in x:
            _feed(h, v)
        h.update(b")")
    else:
        h.update(repr(x).encode())


def data_fingerprint(data: Iterable[Any]) -> str:
    """SHA-256 of a re-iterable of batches (module docs); ``"none"`` for ``None``."""
    if data is None:
        return "none"
    digests = []
    for batch in data:
        h = hashlib.sha256()
        _feed(h, batch)
        digests.append(h.hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:32]


def callable_name(fn: Any) -> str:
    """A stable name for a loss or factory: ``module.qualname`` and a loss object's simple attributes."""
    if fn is None:
        return "model's own loss"
    if isinstance(fn, functools.partial):
        return f"partial({callable_name(fn.func)}, {fn.args!r}, {sorted(fn.keywords.items())!r})"
    target = getattr(fn, "fn", None) or fn  # hesd.BatchLoss keeps the user's function as .fn
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    module = getattr(target, "__module__", None) or type(target).__module__
    attrs = ""
    if not hasattr(target, "__qualname__"):  # an object: its simple settings tell apart two of one class
        simple = {k: v for k, v in sorted(vars(target).items()) if not k.startswith("_")
                  and isinstance(v, (int, float, str, bool, type(None)))}  # fmt: skip
        attrs = f"{simple}" if simple else ""
    return f"{type(fn).__name__ + ':' if target is not fn else ''}{module}.{name}{attrs}"


def model_fingerprint(model: nn.Module | None) -> str:
    """SHA-256 (32 hex digits) of the model's parameter and buffer names, shapes and dtypes."""
    if model is None:
        return "from each checkpoint folder"
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}{tuple(t.shape)}{t.dtype};".encode())
    return f"{type(model).__qualname__}:{h.hexdigest()[:32]}"


def inputs_fingerprint(data: Any, heldout: Any, loss_fn: Any, model: nn.Module | None) -> dict[str, str]:
    """The fingerprint a results folder stores for its inputs."""
    return {
        "data": data_fingerprint(data),
        "heldout": data_fingerprint(heldout),
        "loss": callable_name(loss_fn),
        "model": model_fingerprint(model),
    }
