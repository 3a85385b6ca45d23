"""Analyse a series of checkpoints and choose one.

:func:`analyze_checkpoints` loads each checkpoint of a series into a model, analyses it with
the *same probe vectors* (same seed) through :func:`hesd.analyze_model`, records one row per
checkpoint as soon as it is done (:class:`~hesd.analysis.recorder.SeriesRecorder`), resumes
after an interruption, records failed checkpoints as failed (and goes on), and applies the
selection rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .._version import __version__
from ..algorithms.probes import STREAM as PROBE_STREAM
from ..algorithms.spectrum import Spectrum
from ..checks import check_device
from ..collectives import broadcast, consensus, rank_and_world, resolve_group
from ..errors import CheckpointError, HesdError, HesdTypeError, HesdValueError
from ..operators.data import as_reiterable
from .baselines import distance
from .checkpoints import CheckpointInfo, apply_state_dict, discover_checkpoints, load_state_dict, sha256_file
from .cost import estimate_cost, say_cost
from .fingerprint import inputs_fingerprint
from .hf_checkpoints import load_hf_checkpoint
from .memory_plan import plan_for_settings
from .model import analyze_model as analyze_model
from .model import check_inputs
from .recorder import SeriesRecorder
from .rows import RowIdentity
from .rows import build_table as build_table
from .selection import SelectionRule
from .settings import AnalysisSettings as AnalysisSettings
from .store import ResultStore

# AnalysisSettings, analyze_model and build_table are importable from here as before; they are defined in
# settings.py, model.py and rows.py.
__all__ = ["CheckpointJob", "SeriesResult", "analyze_checkpoints"]

#: errors that fail one checkpoint (recorded as a failed row) instead of the series
CHECKPOINT_ERRORS = (HesdError, FileNotFoundError, ValueError, TypeError, RuntimeError)


@dataclass
class SeriesResult:
    """Outcome of :func:`analyze_checkpoints`.

    Attributes:
        table: one row per checkpoint, series order (``pandas.DataFrame``).
        selections: per rule, the chosen checkpoint, epoch, reason and (with held-out
            accuracy) the gap to the best checkpoint.
        spectra: SLQ spectrum per checkpoint path.
        failed: ``(checkpoint, error message)`` of checkpoints that could not be analysed.
        out_dir: the results folder, if any.
    """

    table: pd.DataFrame
    selections: dict[str, dict]
    spectra: dict[str, Spectrum]
    failed: list[tuple[str, str]]
    out_dir: Path | None
    settings: AnalysisSettings

    def select(self, rule: SelectionRule):
        """Apply another selection rule to the table."""
        return rule.select(self.table)


def analyze_checkpoints(
    model_factory: Callable[[], nn.Module] | None,
    checkpoints: str | Path | Iterable[str | Path],
    data: Any,
    *,
    loss_fn: Any = nn.functional.cross_entropy,
    heldout: Any = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    out_dir: str | Path | None = None,
    settings: AnalysisSettings | None = None,
    rules: list[SelectionRule] | None = None,
    epochs: Iterable[int] | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
    progress: Callable[[str, Any], None] | None = None,
    process_group: Any = None,
    parallel: str = "data",
) -> SeriesResult:
    """Analyse a series of checkpoints and choose one.

    Args:
        model_factory: returns a fresh ``nn.Module`` of the checkpoints' architecture. For
            Hugging Face checkpoint folders (:mod:`hesd.analysis.hf_checkpoints`) it may be
            ``None`` (the model is built from each folder's ``config.json``); for a PEFT adapter
            folder it builds the base model.
        checkpoints: files, folders or glob patterns; ordered by the epoch or step parsed
            from their names (``epoch_012.pt``), by a ``Trainer`` folder's ``global_step``, or
            by ``epochs``.
        data: training data (see :class:`hesd.HessianOperator`).
        loss_fn: loss (default cross-entropy); ``None`` for the model's own loss (Hugging Face
            models, dict batches), as for :class:`hesd.HessianOperator`.
        heldout: held-out data: loss and accuracy are recorded per checkpoint.
        evaluate: ``evaluate(model) -> {"accuracy": ..., ...}`` instead of the default held-out evaluation.
        out_dir: results folder (durable, resumable); ``None`` keeps everything in memory. The
            folder is one series: the returned table, its tables and its picks cover every
            checkpoint it holds, those an earlier invocation analysed included.
        settings: :class:`AnalysisSettings`.
        rules: selection rules (default: highest Ct among MP, smallest λmax, held-out oracle).
        epochs: explicit epochs, one per checkpoint.
        overwrite: discard results in ``out_dir`` made with other settings.
        trust_pickle: allow arbitrary unpickling of ``.pt`` files (unsafe; default off).
        progress: ``progress(event, payload)`` hook; events ``"start"`` (list of
            checkpoints), ``"checkpoint"`` (info), ``"step"`` ((probe, step)), ``"done"`` (row).
        process_group: a ``torch.distributed`` group (or ``True``) to spread the work; only
            rank 0 writes to ``out_dir``; every rank returns the same result.
        parallel: ``"data"`` — each rank passes its shard of ``data`` and every HVP is
            all-reduced; ``"checkpoints"`` — each rank passes all the data and analyses every
            ``world``-th checkpoint (see :mod:`hesd.distributed` for when to use which).

    Returns:
        :class:`SeriesResult`. A checkpoint that fails (corrupt, mismatched, refused,
        non-finite loss) is recorded with ``status="failed"`` and its error; the others go on.

    Examples:
        >>> import tempfile, torch, hesd
        >>> from hesd.models import DigitsMLP, load_digits_tensors
        >>> X, y, Xh, yh = load_digits_tensors()
        >>> d = tempfile.mkdtemp()
        >>> for e in range(2):
        ...     _ = torch.manual_seed(e)
        ...     torch.save(DigitsMLP().state_dict(), f"{d}/epoch_{e}.pt")
        >>> res = hesd.analyze_checkpoints(DigitsMLP, d, (X, y), heldout=(Xh, yh),
        ...                                settings=hesd.AnalysisSettings(num_steps=10, num_probes=1))
        >>> list(res.table["epoch"]), res.table["status"].tolist()
        ([0, 1], ['ok', 'ok'])
    """
    s = settings or AnalysisSettings()
    if parallel not in ("data", "checkpoints"):
        raise HesdValueError(f"analyze_checkpoints: parallel must be 'data' or 'checkpoints', got {parallel!r}")
    group = resolve_group(process_group)
    rank, _ = rank_and_world(group)
    infos = discover_checkpoints(checkpoints, epochs)
    # A one-shot iterator (a generator, iter(loader)) is read once here, not used up by the first checkpoint.
    # In data-parallel mode a rank's shard may be empty (more ranks than batches).
    data = as_reiterable(data, "analyze_checkpoints", allow_empty=group is not None and parallel == "data")
    if heldout is not None:
        heldout = as_reiterable(heldout, "analyze_checkpoints")
    model = None
    if any(info.hf_kind is None for info in infos):
        if model_factory is None:
            plain = next(info.path for info in infos if info.hf_kind is None)
            raise HesdValueError(
                f"analyze_checkpoints: {plain} is a checkpoint file, which needs a model_factory (CLI: --model "
                "MODULE:FACTORY); only Hugging Face checkpoint folders build their own model"
            )
        model = place(model_factory(), s)
    shards = rank_and_world(group)[1] if parallel == "data" else 1  # ranks splitting the Lanczos vectors
    first_folder = _check_inputs_once(model, infos, data, loss_fn, s, model_factory, group, shards)
    store, error = None, None
    if out_dir is not None and rank == 0:
        try:
            fingerprint = {"analysis": s.to_dict(), "hesd": __version__, "probes": PROBE_STREAM,
                           "inputs": inputs_fingerprint(data, heldout, loss_fn, model)}  # fmt: skip
            store = ResultStore(out_dir, fingerprint, overwrite=overwrite)
        except Exception as exc:
            error = exc
    if group is not None:
        msg = consensus(group, error)
        if msg is not None:
            if error is not None:
                raise error
            raise HesdValueError(f"analyze_checkpoints: rank 0 failed: {msg}")
    elif error is not None:
        raise error
    try:
        return _run_series(infos, model, model_factory, data, loss_fn, heldout, evaluate, s, store, rules,
                           trust_pickle, progress, group, parallel, out_dir, first_folder)  # fmt: skip
    finally:
        if store is not None:
            store.close()


def _check_inputs_once(model, infos, data, loss_fn, s, model_factory, group, shards) -> tuple[str, Any] | None:
    """:func:`~hesd.analysis.model.check_inputs` on the first batch (every rank), before any checkpoint.

    With ``max_memory``, the memory plan too (:func:`~hesd.analysis.memory_plan.plan_memory`);
    then the cost estimate (:mod:`hesd.analysis.cost`). Returns the Hugging Face folder loaded to
    check (its path and model), so the series does not load it again.
    """
    error, loaded = None, None
    try:
        probe = model
        if probe is None:  # Hugging Face folders only: the first one that loads (a corrupt one is its own row)
            for info in infos:
                try:
                    probe = CheckpointJob.load_folder(info, model_factory, s)
                    loaded = (str(info.path), probe)
                    break
                except CHECKPOINT_ERRORS:
                    continue
        if probe is not None:
            check_inputs(probe, data, loss_fn, s.params, "analyze_checkpoints")  # probe is placed already
            plan = None
            if s.max_memory is not None:  # a budget no plan fits stops the run here, not at every checkpoint
                plan = plan_for_settings(probe, loss_fn, data, s, shards=shards)
            try:  # a model no product works for fails at its checkpoints, with the reason, not here
                estimate = estimate_cost(probe, loss_fn, data, s, len(infos), s.params,
                                         plan.operator_kwargs() if plan is not None else None)  # fmt: skip
            except Exception:
                estimate = None
            if estimate is not None and rank_and_world(group)[0] == 0:
                say_cost(estimate)
    except HesdValueError as exc:
        error = exc
    if group is not None:
        msg = consensus(group, error)
        if msg is not None:
            raise error if error is not None else HesdValueError(f"analyze_checkpoints: another rank: {msg}")
    elif error is not None:
        raise error
    return loaded


def _run_series(infos, model, model_factory, data, loss_fn, heldout, evaluate, s, store, rules, trust_pickle,
                progress, group, parallel, out_dir, first_folder=None) -> SeriesResult:  # fmt: skip
    rank, world = rank_and_world(group)
    # Rank 0's stored rows decide what is resumed, identically on every rank.
    cached = broadcast({r["checkpoint"]: r for r in store.rows()} if store is not None else {}, group)
    if progress:
        progress("start", infos)
    # The folder is the series: rows an earlier invocation stored for other checkpoints stay in the tables and picks.
    ours = {str(info.path) for info in infos}
    recorder = SeriesRecorder(s, store, rules=rules, order="epoch",
                              rows=[r for c, r in cached.items() if c not in ours])  # fmt: skip
    split = parallel == "checkpoints" and group is not None
    initial = _initial_state(infos, trust_pickle)
    job = CheckpointJob(model, data, loss_fn, heldout, evaluate, s, cached, trust_pickle, progress,
                        None if split else group, model_factory, first_folder, initial)  # fmt: skip
    step = world if split else 1
    for start in range(0, len(infos), step):
        chunk = infos[start : start + step]
        if split:
            mine = job.run(chunk[rank]) if rank < len(chunk) else None
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, mine, group=group)
            done = [r for r in gathered if r is not None]
        else:
            done = [job.run(chunk[0])]
        for row, new in done:
            recorder.record(row, store=new)  # the tables on disk follow every finished checkpoint
    table, selections, spectra = recorder.build()
    failed = [(r["checkpoint"], r["error"]) for r in recorder.rows if r["status"] != "ok"]
    return SeriesResult(table, selections, spectra, failed, Path(out_dir) if out_dir else None, s)


def _initial_state(infos: list[CheckpointInfo], trust_pickle: bool) -> dict[str, torch.Tensor] | None:
    """The series' initial checkpoint's weights (for ``dist_init``), or ``None`` (none, a folder, unreadable)."""
    first = next((i for i in infos if i.initial and i.hf_kind is None), None)
    if first is None:
        return None
    try:
        return load_state_dict(first.path, trust_pickle=trust_pickle)
    except CHECKPOINT_ERRORS:  # its own row says why
        return None


def place(model: Any, settings: AnalysisSettings) -> nn.Module:
    """``model`` checked, in the settings' dtype and on their device."""
    if not isinstance(model, nn.Module):
        raise HesdTypeError(f"analyze_checkpoints: the model factory returned {type(model).__name__}, not an nn.Module")
    if settings.dtype is not None:
        model = model.to(getattr(torch, settings.dtype))
    if settings.device is not None:
        model = model.to(check_device(settings.device, "device", "analyze_checkpoints"))
    return model


@dataclass
class CheckpointJob:
    """Everything :func:`analyze_checkpoints` needs to analyse one checkpoint of a series.

    Attributes:
        model: the model checkpoint files are loaded into (reused across checkpoints); ``None``
            when every checkpoint is a Hugging Face folder (each builds its own model).
        data: training data (this rank's shard under data parallelism).
        loss_fn: the loss.
        heldout: held-out data, or ``None``.
        evaluate: a custom held-out evaluation, or ``None``.
        settings: the analysis settings.
        cached: rows stored earlier, by checkpoint identity (resume).
        trust_pickle: allow arbitrary unpickling of ``.pt`` files.
        progress: the progress hook, or ``None``.
        group: the process group of a data-parallel analysis, or ``None``.
        model_factory: for Hugging Face folders, builds an adapter's base model (or overrides
            ``config.json``'s architecture).
        preloaded: ``(path, model)`` of a Hugging Face folder already loaded (by the up-front
            check), used once instead of loading it again.
        initial: the series' initial weights; each row then records ``dist_init``.
    """

    model: nn.Module | None
    data: Any
    loss_fn: Callable
    heldout: Any
    evaluate: Callable[[nn.Module], dict[str, float]] | None
    settings: AnalysisSettings
    cached: dict[str, dict]
    trust_pickle: bool = False
    progress: Callable[[str, Any], None] | None = None
    group: Any = None
    model_factory: Callable[[], nn.Module] | None = None
    preloaded: tuple[str, nn.Module] | None = None
    initial: dict[str, torch.Tensor] | None = None

    def run(self, info: CheckpointInfo) -> tuple[dict, bool]:
        """Analyse the checkpoint ``info``; returns ``(row, new)`` (``new=False``: a stored row resumed)."""
        error: BaseException | None = None
        digest = None
        try:
            digest = sha256_file(info.path)
        except OSError as exc:
            error = CheckpointError(f"{info.path}: cannot read ({exc.strerror})")
        ident = RowIdentity(str(info.path), info.name, info.epoch, digest, info.initial)
        prev = self.cached.get(ident.checkpoint)
        reuse = error is None and prev is not None and prev.get("status") == "ok" and prev.get("sha256") == digest
        if self.group is not None:  # every rank must take the same branch, or the collectives below deadlock
            reuse = consensus(self.group, None if reuse else RuntimeError("recompute")) is None
        if reuse:
            assert prev is not None
            self._progress("cached", prev)
            return prev, False
        self._progress("checkpoint", info)
        model = self.model
        if error is None:
            try:
                model = self._load(info)
            except CHECKPOINT_ERRORS as exc:
                error = exc
        message = consensus(self.group, error) if self.group is not None else (
            None if error is None else f"{type(error).__name__}: {error}")  # fmt: skip
        if message is not None:
            row = ident.failed(message)
        else:
            try:
                cb = (lambda p, j: self._progress("step", (p, j))) if self.progress else None
                assert model is not None
                metrics, spec = analyze_model(model, self.data, loss_fn=self.loss_fn, heldout=self.heldout,
                                              evaluate=self.evaluate, settings=self.settings, callback=cb,
                                              process_group=self.group)  # fmt: skip
                if info.train_epoch is not None:
                    metrics["train_epoch"] = info.train_epoch
                if self.initial is not None:
                    metrics["dist_init"] = distance(model, self.initial, self.settings.params)
                row = ident.ok(metrics, spec)
            except CHECKPOINT_ERRORS as exc:
                row = ident.failed(f"{type(exc).__name__}: {exc}")
        self._progress("done", row)
        return row, True

    @staticmethod
    def load_folder(info: CheckpointInfo, factory: Callable[[], nn.Module] | None, settings: AnalysisSettings):
        """The model of a Hugging Face checkpoint folder (``factory``: an adapter's base, or the architecture)."""
        adapter = info.hf_kind == "adapter"
        model = load_hf_checkpoint(info.path, factory if adapter else None, model_factory=None if adapter else factory)
        return place(model, settings)

    def _load(self, info: CheckpointInfo) -> nn.Module:
        """The model with the checkpoint's weights: a HF folder builds its own, a file goes into ``model``."""
        if info.hf_kind is not None:
            if self.preloaded is not None and self.preloaded[0] == str(info.path):
                model, self.preloaded = self.preloaded[1], None
                return model
            return self.load_folder(info, self.model_factory, self.settings)
        assert self.model is not None
        apply_state_dict(self.model, load_state_dict(info.path, trust_pickle=self.trust_pickle), info.path)
        return self.model

    def _progress(self, event: str, payload: Any) -> None:
        if self.progress is not None:
            self.progress(event, payload)
