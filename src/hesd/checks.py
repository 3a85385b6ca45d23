"""Argument checks shared by every layer: one wording for one kind of mistake.

Each check returns the value it accepted and raises a :class:`hesd.errors.HesdValueError` (or
:class:`~hesd.errors.HesdTypeError`) whose message starts with the public function's name, as
the user wrote the call.

Examples:
    >>> from hesd.checks import check_choice
    >>> check_choice("full", ("full", "window", "none"), "reorth", "slq")
    'full'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

from .errors import HesdTypeError, HesdValueError

__all__ = [
    "check_choice",
    "check_device",
    "check_positive_float",
    "check_positive_int",
    "check_type",
    "is_int_at_least",
]

T = TypeVar("T")


def check_positive_int(value: Any, name: str, caller: str, minimum: int = 1) -> int:
    """``value`` if it is an ``int`` (not a ``bool``) of at least ``minimum``."""
    if not is_int_at_least(value, minimum):
        raise HesdValueError(f"{caller}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def is_int_at_least(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) of at least ``minimum``."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def check_positive_float(value: Any, name: str, caller: str) -> float:
    """``value`` as a float if it is a finite number above zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise HesdValueError(f"{caller}: {name} must be a positive number, got {value!r}")
    return float(value)


def check_choice(value: T, choices: Sequence[T], name: str, caller: str) -> T:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise HesdValueError(f"{caller}: {name} must be one of {allowed}; got {value!r}")
    return value


def check_type(value: Any, types: type | tuple[type, ...], name: str, caller: str, what: str) -> Any:
    """``value`` if it is an instance of ``types``; ``what`` describes them for the message."""
    if not isinstance(value, types):
        raise HesdTypeError(f"{caller}: {name} must be {what}, got {type(value).__name__}")
    return value


def check_device(device: Any, name: str, caller: str) -> Any:
    """``device`` as a ``torch.device`` if it names one that this machine has.

    Examples:
        >>> check_device("cpu", "device", "analyze_checkpoints")
        device(type='cpu')
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise HesdValueError(
            f"{caller}: {name}={device!r} is not a device; use 'cpu', 'cuda', 'cuda:1' or 'mps'"
        ) from None
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None)}.get(dev.type)
    if backend is not None and not backend.is_available():
        build = "" if dev.type != "cuda" or torch.version.cuda else " (this torch is a CPU-only build)"
        raise HesdValueError(
            f"{caller}: {name}={device!r}, but this machine has no usable {dev.type.upper()} device{build}; "
            "leave the device out (or use 'cpu')"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise HesdValueError(
            f"{caller}: {name}={device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    return dev
