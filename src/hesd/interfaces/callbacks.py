"""Training callbacks for PyTorch Lightning and Hugging Face ``transformers`` (optional extras).

Both wrap :class:`hesd.Monitor`: results go to the same store as ``hesd analyze`` and
``hesd report DIR`` renders them. Install with ``pip install 'hesd[lightning]'`` or
``pip install 'hesd[transformers]'``.
"""

from __future__ import annotations

import warnings
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
    """Cross-entropy on ``outputs.logits`` of a classification head, for ``(inputs, labels)`` batches.

    For language models (token logits, shifted labels) use the model's own loss instead:
    ``loss_fn=None`` with dict batches holding ``labels``.
    """
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    if isinstance(logits, torch.Tensor) and logits.ndim > 2:
        raise HesdValueError(
            f"hf_logits_cross_entropy: got token logits of shape {tuple(logits.shape)}; for a language model use "
            "the model's own loss (loss_fn=None, dict batches with 'labels'), which shifts and counts tokens"
        )
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
            """Analyse after the epoch (rank 0), numbered as Lightning numbers it (0: the first epoch).

            The same numbers as ``ModelCheckpoint``'s ``epoch=N`` file names, so a later
            ``hesd analyze`` of those files lines up; no row is the initialisation.
            """
            if trainer.global_rank == 0:
                epoch = trainer.current_epoch
                if epoch % self._args["every"] == self._args["every"] - 1:
                    self._monitor_for(pl_module).step(epoch, force=True, initial=False)

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

    class HesdTrainerCallback(_HFCallback):
        """Analyse the HESD during a Hugging Face ``Trainer`` run (main process only), numbered by step.

        By default the model is analysed each time the ``Trainer`` saves a checkpoint
        (``on_save``) and once more at the end of training if the last state was not analysed;
        ``every_n_steps`` or ``every_n_epochs`` analyse on that schedule instead. Rows are numbered
        by ``global_step`` (fine-tuning counts steps), so a run that ends mid-epoch keeps every
        row. The loss is the model's own (``loss_fn=None``: dict batches with ``labels``, weighted
        by loss-bearing tokens), as the ``Trainer`` trains on. Nothing here can end the training
        run: a failed analysis or save is a warning and a failed row. ``hesd report OUT_DIR``
        renders the results.

        Args:
            data: batches to take the Hessian on: dict batches such as
                ``{input_ids, attention_mask, labels}`` (fixed, un-augmented; e.g.
                :func:`hesd.lm_batches`).
            out_dir: results folder.
            every_n_steps: analyse when ``global_step % every_n_steps == 0``.
            every_n_epochs: analyse at the end of every this many epochs.
            loss_fn: ``None`` (the model's own loss), a ``loss_fn(outputs, targets)`` for
                ``(inputs, targets)`` batches, or :class:`hesd.BatchLoss`.
            heldout: held-out batches (held-out loss per analysis; the held-out pick uses it).
            settings: :class:`hesd.AnalysisSettings`.
            tensorboard: a ``SummaryWriter`` or log folder.

        Raises:
            HesdValueError: both schedules given, or one that is not a positive integer.
        """

        def __init__(
            self,
            data: Any,
            out_dir: str | Path,
            *,
            every_n_steps: int | None = None,
            every_n_epochs: int | None = None,
            loss_fn: Any = None,
            heldout: Any = None,
            settings: AnalysisSettings | None = None,
            tensorboard: Any = None,
        ) -> None:
            for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
                if value is not None and not is_int_at_least(value, 1):
                    raise HesdValueError(f"HesdTrainerCallback: {name} must be a positive integer, got {value!r}")
            if every_n_steps is not None and every_n_epochs is not None:
                raise HesdValueError("HesdTrainerCallback: give every_n_steps or every_n_epochs, not both")
            self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
            self._args = dict(data=data, out_dir=out_dir, loss_fn=loss_fn, heldout=heldout, settings=settings,
                              tensorboard=tensorboard)  # fmt: skip
            self.monitor: Monitor | None = None
            self._done: set[int] = set()
            self._epochs = 0

        def _analyse(self, state, model) -> None:
            if not state.is_world_process_zero or model is None or state.global_step in self._done:
                return
            try:
                if self.monitor is None:
                    a = self._args
                    self.monitor = Monitor(model, a["data"], loss_fn=a["loss_fn"], out_dir=a["out_dir"],
                                           heldout=a["heldout"], settings=a["settings"],
                                           tensorboard=a["tensorboard"], unit="step")  # fmt: skip
                self._done.add(state.global_step)
                self.monitor.step(state.global_step, force=True, initial=state.global_step == 0)
            except Exception as exc:  # never end the training run (a bad folder, bad data)
                message = f"analysis at step {state.global_step} skipped ({type(exc).__name__}: {exc})"
                warnings.warn(f"HesdTrainerCallback: {message}; training goes on", RuntimeWarning, stacklevel=2)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            """Analyse every ``every_n_steps`` steps."""
            if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
                self._analyse(state, model)
            return control

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            """Analyse every ``every_n_epochs`` epochs."""
            self._epochs += 1
            if self.every_n_epochs is not None and self._epochs % self.every_n_epochs == 0:
                self._analyse(state, model)
            return control

        def on_save(self, args, state, control, model=None, **kwargs):
            """Analyse the state the ``Trainer`` just saved (the default schedule)."""
            if self.every_n_steps is None and self.every_n_epochs is None:
                self._analyse(state, model)
            return control

        def on_train_end(self, args, state, control, model=None, **kwargs):
            """Analyse the final state if it was not, then write the report (main process)."""
            self._analyse(state, model)
            if state.is_world_process_zero and self.monitor is not None:
                try:
                    self.monitor.finalize(landscape=False)
                except Exception as exc:
                    warnings.warn(f"HesdTrainerCallback: report skipped ({type(exc).__name__}: {exc})",
                                  RuntimeWarning, stacklevel=2)  # fmt: skip
            return control

else:  # pragma: no cover - depends on the environment

    class HesdTrainerCallback:  # type: ignore[no-redef]
        """Placeholder raising a clear error when transformers is not installed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError("HesdTrainerCallback needs transformers: pip install 'hesd[transformers]'")
