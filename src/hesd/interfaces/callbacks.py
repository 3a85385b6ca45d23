"""Training callbacks for PyTorch Lightning and Hugging Face ``transformers`` (optional extras).

Both wrap :class:`hesd.Monitor`: results go to the same store as ``hesd analyze`` and
``hesd report DIR`` renders them. Install with ``pip install 'hesd[lightning]'`` or
``pip install 'hesd[transformers]'``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis.settings import AnalysisSettings
from ..checks import is_int_at_least
from ..errors import HesdValueError
from .monitor import Monitor

__all__ = ["HesdLightningCallback", "HesdTrainerCallback", "hf_logits_cross_entropy"]

_pl: Any
try:  # Lightning 2.x ships as `lightning`; older installs as `pytorch_lightning`
    import lightning.pytorch as _pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as _pl
    except ImportError:
        _pl = None

_HFCallback: Any
try:
    from transformers import TrainerCallback as _HFCallback
except ImportError:  # pragma: no cover - depends on the environment
    _HFCallback = None


def hf_logits_cross_entropy(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on ``outputs.logits`` (Hugging Face model outputs)."""
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    return nn.functional.cross_entropy(logits, targets)


class _MonitorMixin:
    def _init_monitor_args(self, data, out_dir, every_n_epochs, loss_fn, heldout, settings, tensorboard) -> None:
        if not is_int_at_least(every_n_epochs, 1):
            raise HesdValueError(
                f"{type(self).__name__}: every_n_epochs must be a positive integer, got {every_n_epochs!r}"
            )
        self._args = dict(data=data, out_dir=out_dir, every=every_n_epochs, loss_fn=loss_fn, heldout=heldout,
                          settings=settings, tensorboard=tensorboard)  # fmt: skip
        self.monitor: Monitor | None = None

    def _monitor_for(self, model: nn.Module) -> Monitor:
        if self.monitor is None:
            a = self._args
            self.monitor = Monitor(model, a["data"], loss_fn=a["loss_fn"], out_dir=a["out_dir"], heldout=a["heldout"],
                                   settings=a["settings"], every=a["every"], tensorboard=a["tensorboard"])  # fmt: skip
        return self.monitor


if _pl is not None:

    class HesdLightningCallback(_MonitorMixin, _pl.Callback):
        """Analyse the HESD every N training epochs of a Lightning ``Trainer`` (rank 0 only).

        Args:
            data: batches to take the Hessian on (fixed, un-augmented).
            out_dir: results folder.
            every_n_epochs: analyse every this many epochs.
            loss_fn: ``loss_fn(pl_module(inputs), targets)``; default cross-entropy.
            heldout: held-out batches for loss/accuracy.
            settings: :class:`hesd.AnalysisSettings`.
            tensorboard: a ``SummaryWriter`` or log folder.
        """

        def __init__(
            self,
            data: Any,
            out_dir: str | Path,
            *,
            every_n_epochs: int = 1,
            loss_fn: Callable = nn.functional.cross_entropy,
            heldout: Any = None,
            settings: AnalysisSettings | None = None,
            tensorboard: Any = None,
        ) -> None:
            super().__init__()
            self._init_monitor_args(data, out_dir, every_n_epochs, loss_fn, heldout, settings, tensorboard)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            """Analyse after the epoch (rank 0), numbered as Lightning numbers epochs plus one."""
            if trainer.global_rank == 0:
                self._monitor_for(pl_module).step(trainer.current_epoch + 1)

        def on_fit_end(self, trainer, pl_module) -> None:
            """Write the landscape and the report (rank 0)."""
            if trainer.global_rank == 0 and self.monitor is not None:
                self.monitor.finalize()

else:  # pragma: no cover - depends on the environment

    class HesdLightningCallback:  # type: ignore[no-redef]
        """Placeholder raising a clear error when Lightning is not installed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError("HesdLightningCallback needs Lightning: pip install 'hesd[lightning]'")


if _HFCallback is not None:

    class HesdTrainerCallback(_MonitorMixin, _HFCallback):
        """Analyse the HESD every N epochs of a Hugging Face ``Trainer`` (main process only).

        Args:
            data: ``(inputs_dict, labels)`` batches to take the Hessian on.
            out_dir: results folder.
            every_n_epochs: analyse every this many epochs.
            loss_fn: default :func:`hf_logits_cross_entropy`.
            heldout, settings, tensorboard: as for :class:`hesd.Monitor`.
        """

        def __init__(
            self,
            data: Any,
            out_dir: str | Path,
            *,
            every_n_epochs: int = 1,
            loss_fn: Callable = hf_logits_cross_entropy,
            heldout: Any = None,
            settings: AnalysisSettings | None = None,
            tensorboard: Any = None,
        ) -> None:
            self._init_monitor_args(data, out_dir, every_n_epochs, loss_fn, heldout, settings, tensorboard)

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            """Analyse after the epoch (main process)."""
            if state.is_world_process_zero and model is not None:
                self._monitor_for(model).step(round(state.epoch or 0))
            return control

        def on_train_end(self, args, state, control, model=None, **kwargs):
            """Write the report (main process)."""
            if state.is_world_process_zero and self.monitor is not None:
                self.monitor.finalize(landscape=False)
            return control

else:  # pragma: no cover - depends on the environment

    class HesdTrainerCallback:  # type: ignore[no-redef]
        """Placeholder raising a clear error when transformers is not installed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError("HesdTrainerCallback needs transformers: pip install 'hesd[transformers]'")
