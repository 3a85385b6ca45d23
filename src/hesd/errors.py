"""Exceptions raised by hesd.

Every error hesd raises on bad input derives from :class:`HesdError` and from the matching
built-in (``ValueError``, ``TypeError``, ``FileNotFoundError``, ``PermissionError``,
``RuntimeError``, ``FloatingPointError``), so callers can catch either: ``except
hesd.HesdError`` catches everything hesd refuses, ``except ValueError`` keeps working. Messages
name the function, the problem and the fix.

Examples:
    >>> import torch, hesd
    >>> try:
    ...     hesd.slq(torch.eye(3, dtype=torch.float64), num_steps=0)
    ... except hesd.HesdError as exc:
    ...     print(type(exc).__name__, isinstance(exc, ValueError))
    HesdValueError True
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "HesdError",
    "HesdFileNotFoundError",
    "HesdPermissionError",
    "HesdTypeError",
    "HesdValueError",
    "InsecureCheckpointError",
    "MemoryBudgetError",
    "NonDeterministicError",
    "NonFiniteError",
    "NonFiniteLossError",
    "UnsupportedModelError",
]


class HesdError(Exception):
    """Base class of all hesd errors."""


class HesdValueError(HesdError, ValueError):
    """An argument has the right type but a value hesd cannot use."""


class HesdTypeError(HesdError, TypeError):
    """An argument has a type hesd cannot use."""


class HesdFileNotFoundError(HesdError, FileNotFoundError):
    """A file or folder the call names does not exist (or holds nothing hesd can use)."""


class HesdPermissionError(HesdError, PermissionError):
    """A folder hesd must write to cannot be created or written."""


class MemoryBudgetError(HesdValueError):
    """No plan for the analysis fits the memory budget (the message lists each part and the options)."""


class NonFiniteError(HesdError, FloatingPointError):
    """A computed quantity (a loss, a gradient, a product) is NaN or infinite."""


class NonFiniteLossError(NonFiniteError):
    """The loss (or a gradient) evaluated to NaN or infinity."""


class NonDeterministicError(HesdError, RuntimeError):
    """Two evaluations with identical inputs disagreed (dropout, BatchNorm in train mode, augmentation)."""


class UnsupportedModelError(HesdError, RuntimeError):
    """PyTorch cannot take the second derivative this product needs through one of the model's operations."""


class CheckpointError(HesdError, ValueError):
    """A checkpoint file is unreadable, corrupt, or does not match the model."""


class InsecureCheckpointError(CheckpointError):
    """A checkpoint needs arbitrary unpickling, which hesd refuses by default."""
