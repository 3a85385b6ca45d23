"""Training-time monitoring: analyse the model every N epochs (or steps) from a training loop.

Rows go to the same :class:`~hesd.analysis.store.ResultStore` layout as ``hesd analyze``,
so ``hesd report DIR`` works on either. Optionally each analysed state is saved as
``DIR/checkpoints/epoch_NNNN.safetensors`` (``step_NNNNNNN`` when counting steps), so the
report can draw the landscape of the chosen checkpoint; tied weights (an output layer sharing
the embedding) are stored once, as safetensors requires, and restored on loading. The scalars
and Ritz-value histogram go to TensorBoard. Nothing here ends the training run: a failed save
or analysis is a warning and a failed row.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from ..algorithms.probes import STREAM as PROBE_STREAM
from ..analysis.checkpoints import sha256_file, tied_groups
from ..analysis.model import analyze_model
from ..analysis.recorder import SeriesRecorder
from ..analysis.rows import VIEWS, RowIdentity
from ..analysis.settings import AnalysisSettings
from ..analysis.store import ResultStore
from ..checks import check_choice, check_type, is_int_at_least
from ..errors import HesdValueError

__all__ = ["Monitor"]


class Monitor:
    """Analyse a model's HESD during training.

    Args:
        model: the model being trained (analysed in place, its mode and buffers restored).
        data: the data to take the Hessian on (a fixed, un-augmented loader or batch).
        loss_fn: ``loss_fn(outputs, targets)``; default cross-entropy.
        out_dir: results folder (``None``: keep rows in memory only).
        heldout: held-out data for loss/accuracy per analysis.
        evaluate: ``evaluate(model) -> dict`` instead of the default held-out evaluation.
        settings: :class:`hesd.AnalysisSettings`.
        every: analyse when ``epoch % every == 0``.
        save_checkpoints: save each analysed state as safetensors under ``out_dir/checkpoints``.
        tensorboard: a ``SummaryWriter``, a log folder, or ``None``.
        overwrite: discard results in ``out_dir`` made with other settings.
        unit: ``"epoch"`` or ``"step"``: what :meth:`step`'s number counts (file names, report).

    Examples:
        >>> import torch, hesd
        >>> model = torch.nn.Linear(4, 3)
        >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> mon = hesd.Monitor(model, data, settings=hesd.AnalysisSettings(num_steps=8, num_probes=1))
        >>> for epoch in range(1, 3):
        ...     row = mon.step(epoch)  # after each epoch of training
        >>> list(mon.table["epoch"])
        [1, 2]
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        *,
        loss_fn: Callable = nn.functional.cross_entropy,
        out_dir: str | Path | None = None,
        heldout: Any = None,
        evaluate: Callable[[nn.Module], dict] | None = None,
        settings: AnalysisSettings | None = None,
        every: int = 1,
        save_checkpoints: bool = True,
        tensorboard: Any = None,
        overwrite: bool = False,
        unit: str = "epoch",
    ) -> None:
        check_type(model, nn.Module, "model", "Monitor", "an nn.Module")
        if not is_int_at_least(every, 1):
            raise HesdValueError(f"Monitor: every must be a positive integer, got {every!r}")
        self.model, self.data, self.loss_fn = model, data, loss_fn
        self.heldout, self.evaluate = heldout, evaluate
        self.settings = settings or AnalysisSettings()
        self.every = every
        check_choice(unit, ("epoch", "step"), "unit", "Monitor")
        self.unit = unit
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.save_checkpoints = save_checkpoints and self.out_dir is not None
        fingerprint = {"analysis": self.settings.to_dict(), "source": "monitor", "unit": unit, "probes": PROBE_STREAM}
        store = ResultStore(self.out_dir, fingerprint, overwrite=overwrite) if self.out_dir is not None else None
        self.recorder = SeriesRecorder(self.settings, store, order="epoch", rows=store.rows() if store else ())
        self._writer = self._make_writer(tensorboard)

    @staticmethod
    def _make_writer(tb: Any):
        if tb is None or hasattr(tb, "add_scalar"):
            return tb
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn(
                "Monitor: TensorBoard is not installed; pip install tensorboard", RuntimeWarning, stacklevel=3
            )
            return None
        return SummaryWriter(log_dir=str(tb))

    def _save(self, epoch: int) -> tuple[str, str | None]:
        ident = f"monitor:{self.unit}={epoch}"
        if not self.save_checkpoints:
            return ident, None
        from safetensors.torch import save_file

        width = 4 if self.unit == "epoch" else 7
        path = self.out_dir / "checkpoints" / f"{self.unit}_{epoch:0{width}d}.safetensors"  # type: ignore[operator]
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            state = self.model.state_dict()
            for names in tied_groups(self.model):  # safetensors refuses shared tensors: keep the first name
                for alias in names[1:]:
                    state.pop(alias, None)
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
            os.replace(tmp, path)
            return str(path.resolve()), sha256_file(path)
        except Exception as exc:  # the analysis goes on without a file (no landscape for this state)
            warnings.warn(f"Monitor: could not save the {self.unit}-{epoch} state ({type(exc).__name__}: {exc}); "
                          "analysing it without a checkpoint file", RuntimeWarning, stacklevel=3)  # fmt: skip
            tmp.unlink(missing_ok=True)
            return ident, None

    def step(self, epoch: int, *, force: bool = False, initial: bool | None = None) -> dict | None:
        """Analyse now if ``epoch % every == 0`` (or ``force``); return the row, or ``None`` if skipped.

        ``initial``: the state is the initialisation, which selection rules skip (default:
        ``epoch == 0``, i.e. numbered from 1 after each epoch; pass ``False`` when 0 is the first
        trained epoch, as in Lightning). A failure (e.g. a non-finite loss) is recorded as a
        failed row with a warning; training is not interrupted.
        """
        if not force and epoch % self.every != 0:
            return None
        ident, digest = self._save(epoch)
        identity = RowIdentity(ident, Path(ident).name if digest else ident, int(epoch), digest, initial)
        spec = None
        try:
            metrics, spec = analyze_model(
                self.model, self.data, loss_fn=self.loss_fn, heldout=self.heldout, evaluate=self.evaluate,
                settings=self.settings,
            )  # fmt: skip
            row = identity.ok(metrics, spec)
        except Exception as exc:  # training goes on whatever the analysis met (a bad batch, a model bug)
            warnings.warn(
                f"Monitor: analysis at {self.unit} {epoch} failed ({type(exc).__name__}: {exc}); training goes on",
                RuntimeWarning,
                stacklevel=2,
            )
            row = identity.failed(f"{type(exc).__name__}: {exc}")
        self.recorder.record(row)
        if self._writer is not None and spec is not None:
            for key in VIEWS["scalars"]:
                self._writer.add_scalar(f"hesd/{key}", float(row[key]), epoch)
            import numpy as np

            ritz = np.concatenate(spec.values)
            self._writer.add_histogram("hesd/ritz_values", ritz, epoch)
            self._writer.flush()
        return row

    __call__ = step

    @property
    def table(self) -> pd.DataFrame:
        """The results so far, one row per analysed epoch."""
        return self.recorder.table

    @property
    def selections(self) -> dict[str, dict]:
        """What each selection rule picks so far."""
        return self.recorder.selections

    def finalize(self, *, landscape: bool = True, report: bool = True) -> Path | None:
        """Compute the landscape of the pick (needs saved checkpoints) and write the report; return its path."""
        if self.out_dir is None or not len(self.recorder):
            return None
        if landscape and self.save_checkpoints:
            from ._common import store_landscape

            params = next(self.model.parameters())

            def factory() -> nn.Module:
                import copy

                return copy.deepcopy(self.model).to(params.device)

            try:
                store_landscape(self.out_dir, factory, self.data, self.loss_fn, self.selections,
                                model_mode=self.settings.model_mode, seed=self.settings.seed,
                                max_memory=self.settings.max_memory)  # fmt: skip
            except Exception as exc:  # the report is still written
                warnings.warn(f"Monitor: landscape skipped ({type(exc).__name__}: {exc})", RuntimeWarning, stacklevel=2)
        if self._writer is not None:
            self._writer.flush()
        if report:
            from .report import build_report

            return build_report(self.out_dir)
        return None

    def __repr__(self) -> str:
        return f"Monitor(every={self.every}, rows={len(self.recorder)}, out_dir={self.out_dir})"
