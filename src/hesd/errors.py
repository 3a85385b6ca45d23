"""Exceptions raised by hesd.

Every error hesd raises on bad input derives from :class:`HesdError` and from the
matching built-in (``ValueError``, ``TypeError``, ``RuntimeError``), so callers can
catch either. Messages name the function, the problem and the fix.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "HesdError",
    "InsecureCheckpointError",
    "NonDeterministicError",
    "NonFiniteLossError",
]


class HesdError(Exception):
    """Base class of all hesd errors."""


class NonFiniteLossError(HesdError, FloatingPointError):
    """The loss (or a gradient) evaluated to NaN or infinity."""


class NonDeterministicError(HesdError, RuntimeError):
    """Two evaluations with identical inputs disagreed (dropout, BatchNorm in train mode, augmentation)."""


class CheckpointError(HesdError, ValueError):
    """A checkpoint file is unreadable, corrupt, or does not match the model."""


class InsecureCheckpointError(CheckpointError):
    """A checkpoint needs arbitrary unpickling, which hesd refuses by default."""
