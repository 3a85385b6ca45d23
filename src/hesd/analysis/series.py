"""Analyse one model or a series of checkpoints: spectra, criteria, HESD type, QS, selection.

:func:`analyze_model` analyses the model as it is; :func:`analyze_checkpoints` loads each
checkpoint of a series into a model, analyses it with the *same probe vectors* (same
seed), writes one row per checkpoint to a :class:`~hesd.analysis.store.ResultStore` as
soon as it is done, resumes after an interruption, records failed checkpoints as failed
(and goes on), and applies the selection rules.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._version import __version__
from ..algorithms.lanczos import eigenvalues
from ..algorithms.slq import plan_basis, slq
from ..algorithms.spectrum import Spectrum
from ..errors import CheckpointError, HesdError
from ..operators.hessian import HessianOperator
from .checkpoints import CheckpointInfo, apply_state_dict, discover_checkpoints, load_state_dict, sha256_file
from .criteria import compare_criteria, criteria, probe_summary
from .selection import QSRule, SelectionRule, default_rules, select_all
from .store import ResultStore

__all__ = ["AnalysisSettings", "SeriesResult", "analyze_checkpoints", "analyze_model", "build_table"]

TABLE_COLUMNS = [
    "checkpoint", "name", "epoch", "status", "lambda_min", "lambda_max", "trace", "trace_se", "re", "re_std",
    "kh05", "kh05_std", "ct", "ct_std", "hesd_type", "qs_flag", "qs_lambda_ratio", "qs_width_ratio",
    "qs_zero_mass", "width", "stable_step", "eos_ratio", "train_loss", "grad_norm", "heldout_loss",
    "heldout_accuracy", "hvps", "seconds", "sha256", "error",
]  # fmt: skip


@dataclass
class AnalysisSettings:
    """Settings of an analysis; stored with the results so runs never mix silently.

    Attributes:
        num_steps: Lanczos steps per SLQ probe.
        num_probes: SLQ probes (the same at every checkpoint).
        seed: probe seed.
        reorth: SLQ re-orthogonalisation (``"full"``, ``"window"``, ``"none"``).
        window: window for ``reorth="window"``.
        n: exponent of :math:`K_{h,n}`.
        ct_threshold: MP/MN threshold on Ct.
        aggregate: ``"mean"`` or ``"pooled"`` Ct (see :func:`hesd.criteria`).
        zero_band: band (relative to λmax) for the per-checkpoint zero mass.
        model_mode: ``"eval"`` or ``"train"`` (see :class:`hesd.HessianOperator`).
        refine_extremes: certify λmin and λmax with restarted Lanczos (``which="BE"``) to
            ``extreme_tol`` instead of reporting SLQ's extreme Ritz values.
        extreme_tol: relative residual tolerance for the refinement.
        heldout_criteria: also compute the criteria on the held-out data.
        lr: the optimiser's learning rate, for the edge-of-stability ratio.
        dtype: ``"float32"``/``"float64"`` to cast the model to, or ``None`` to keep it.
        device: device to run on (``None``: where the model is).
        qs: the quasi-singular rule.
        params: ``fnmatch`` patterns of parameter names to restrict the Hessian to (block
            analysis, e.g. ``["layers.3.*"]``); ``None``: all trainable parameters.
        max_memory: bytes for the SLQ basis and the kept first-order graphs together; half
            goes to the basis (see :func:`hesd.algorithms.slq.plan_basis` for the modes and
            their accuracy cost), the rest to graphs. ``None``: full basis, default budget.
        stop_tol: adaptive SLQ — stop each probe once λmin, λmax, re and Ct have settled to
            this tolerance (``num_steps`` becomes the cap); see :func:`hesd.slq`. KH05 then
            refers to a varying step count: leave ``None`` when KH05 matters.
    """

    num_steps: int = 80
    num_probes: int = 3
    seed: int = 0
    reorth: str = "full"
    window: int | None = None
    n: float = 0.5
    ct_threshold: float = -0.6
    aggregate: str = "mean"
    zero_band: float = 0.01
    model_mode: str = "eval"
    refine_extremes: bool = True
    extreme_tol: float = 1e-4
    heldout_criteria: bool = False
    lr: float | None = None
    dtype: str | None = None
    device: str | None = None
    qs: QSRule = field(default_factory=QSRule)
    params: list[str] | None = None
    max_memory: int | None = None
    stop_tol: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.qs, dict):
            self.qs = QSRule(**self.qs)
        for name in ("num_steps", "num_probes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AnalysisSettings: {name} must be a positive integer, got {v!r}")
        if self.reorth not in ("full", "window", "none"):
            raise ValueError(f"AnalysisSettings: reorth must be 'full', 'window' or 'none', got {self.reorth!r}")
        if self.dtype not in (None, "float32", "float64"):
            raise ValueError(f"AnalysisSettings: dtype must be 'float32', 'float64' or None, got {self.dtype!r}")
        if self.model_mode not in ("eval", "train"):
            raise ValueError(f"AnalysisSettings: model_mode must be 'eval' or 'train', got {self.model_mode!r}")
        if isinstance(self.params, str):
            self.params = [self.params]
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError(f"AnalysisSettings: max_memory must be a positive number of bytes, got {self.max_memory}")
        if not self.ct_threshold <= 0:
            raise ValueError(f"AnalysisSettings: ct_threshold must be ≤ 0, got {self.ct_threshold}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["qs"] = asdict(self.qs)
        return d


def _accuracy_eval(model: nn.Module, data: Iterable, loss_fn: Callable, device, dtype) -> dict[str, float]:
    from ..operators._data import as_reiterable, call_model, split_batch, to_device

    was = model.training
    model.eval()
    total, loss_sum, correct, classify = 0, 0.0, 0, True
    with torch.no_grad():
        for batch in as_reiterable(data, "heldout"):
            X, y = split_batch(batch, "heldout")
            X, y = to_device(X, device, dtype), to_device(y, device, dtype)
            out = call_model(model, X)
            n = len(y)
            loss_sum += float(loss_fn(out, y)) * n
            total += n
            if classify and isinstance(out, torch.Tensor) and out.ndim == 2 and not y.is_floating_point():
                correct += int((out.argmax(1) == y).sum())
            else:
                classify = False
    model.train(was)
    res = {"heldout_loss": loss_sum / max(total, 1)}
    if classify:
        res["heldout_accuracy"] = correct / max(total, 1)
    return res


def analyze_model(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: Callable = nn.functional.cross_entropy,
    heldout: Any = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    settings: AnalysisSettings | None = None,
    callback: Callable[[int, int], None] | None = None,
    process_group: Any = None,
) -> tuple[dict, Spectrum]:
    """Analyse ``model`` at its current parameters.

    With ``process_group`` each rank passes its shard of ``data`` (data parallel, see
    :mod:`hesd.distributed`); every rank returns the same row. Held-out metrics are computed
    on each rank's ``heldout`` as given (pass the whole held-out set on every rank).

    Returns:
        ``(row, spectrum)``: ``row`` holds λmin, λmax, trace (SLQ estimate ± standard error
        over probes), re, KH05, Khn, Ct (with spreads), HESD type, stability, loss,
        gradient norm, held-out metrics, HVP count and time; ``spectrum`` is the SLQ
        :class:`hesd.Spectrum`.

    Example:
        >>> import torch, hesd
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> row, spec = hesd.analyze_model(model, data, settings=hesd.AnalysisSettings(num_steps=20, num_probes=2))
        >>> row["hesd_type"] in ("MP", "MN"), spec.num_probes
        (True, 2)
    """
    s = settings or AnalysisSettings()
    t0 = time.perf_counter()
    names = select_params(model, s.params) if s.params else None
    slq_kw: dict[str, Any] = {"reorth": s.reorth, "window": s.window}
    graph_budget = None
    if s.max_memory is not None:
        P = sum(p.numel() for n, p in model.named_parameters() if (names is None and p.requires_grad) or
                (names is not None and n in names))  # fmt: skip
        dtype = next(model.parameters()).dtype
        plan = plan_basis(P, s.num_steps, dtype, s.max_memory // 2)
        slq_kw = {k: plan[k] for k in ("reorth", "window", "basis_dtype")}
        slq_kw["lockstep"] = 1  # the basis budget is for one probe at a time
        graph_budget = s.max_memory - plan["basis_bytes"]
    op = HessianOperator(model, loss_fn, data, model_mode=s.model_mode, process_group=process_group, params=names,
                         memory_budget=graph_budget)  # fmt: skip
    if s.stop_tol is not None:
        slq_kw.update(stop_tol=s.stop_tol, stop_on=lambda v, w: probe_summary(v, w, s.n))
    spec = slq(op, s.num_steps, s.num_probes, seed=s.seed, callback=callback, **slq_kw)
    crit = criteria(spec, s.n, s.ct_threshold, aggregate=s.aggregate, zero_band=s.zero_band, lr=s.lr)
    row: dict[str, Any] = crit.to_dict()
    row["slq_lambda_min"], row["slq_lambda_max"] = crit.lambda_min, crit.lambda_max
    if s.refine_extremes:
        ends = eigenvalues(op, k=2, which="BE", tol=s.extreme_tol, seed=s.seed, warn=False)
        lo, hi = float(ends.eigenvalues[0]), float(ends.eigenvalues[1])
        row.update(lambda_min=lo, lambda_max=hi, width=hi - lo, extremes_converged=bool(ends.converged))
        row["stable_step"] = 2.0 / hi if hi > 0 else math.inf
        if s.lr is not None:
            row["eos_ratio"] = s.lr * hi / 2
    per_probe_trace = [spec.dim * float(np.sum(w * v)) for v, w in zip(spec.values, spec.weights, strict=True)]
    row["trace"] = float(np.mean(per_probe_trace))
    row["trace_se"] = float(np.std(per_probe_trace, ddof=1) / math.sqrt(len(per_probe_trace))) \
        if len(per_probe_trace) > 1 else math.nan  # fmt: skip
    row["train_loss"] = op.loss()
    row["grad_norm"] = float(torch.linalg.vector_norm(op.gradient()))
    row["num_params"] = op.shape[0]
    row["num_samples"] = op.num_samples
    metrics: dict[str, float] = {}
    if evaluate is not None:
        metrics = {f"heldout_{k}" if not k.startswith("heldout_") else k: float(v) for k, v in evaluate(model).items()}
    elif heldout is not None:
        metrics = _accuracy_eval(model, heldout, loss_fn, op.device, op.dtype)
    row.update(metrics)
    if s.heldout_criteria and heldout is not None:
        hop = HessianOperator(model, loss_fn, heldout, model_mode=s.model_mode)  # held-out: local, see above
        hspec = slq(hop, s.num_steps, s.num_probes, seed=s.seed, reorth=s.reorth, window=s.window)
        hcrit = criteria(hspec, s.n, s.ct_threshold, aggregate=s.aggregate, zero_band=s.zero_band, lr=s.lr)
        row.update({k: v for k, v in compare_criteria(crit, hcrit).items() if not k.startswith("train_")})
        row["heldout_spectrum"] = hspec.to_dict()
        row["hvps_heldout"] = hop.num_matvecs
    row["hvps"] = op.num_matvecs
    row["seconds"] = time.perf_counter() - t0
    return row, spec


def select_params(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of trainable parameters matching any of the ``fnmatch`` ``patterns``."""
    import fnmatch

    names = [n for n, p in model.named_parameters() if p.requires_grad and any(fnmatch.fnmatchcase(n, pat)
             for pat in patterns)]  # fmt: skip
    if not names:
        raise ValueError(f"params patterns {patterns} match no trainable parameter of the model")
    return names


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


def build_table(
    rows: list[dict], settings: AnalysisSettings, rules: list[SelectionRule] | None = None
) -> tuple[pd.DataFrame, dict[str, dict], dict[str, Spectrum]]:
    """Assemble the tidy table from stored rows (series order), add QS flags, apply the rules."""
    spectra: dict[str, Spectrum] = {}
    records = []
    for r in rows:
        rec = {k: v for k, v in r.items() if k not in ("spectrum", "heldout_spectrum", "per_probe")}
        records.append(rec)
        if r.get("spectrum"):
            spectra[r["checkpoint"]] = Spectrum.from_dict(r["spectrum"])
    table = pd.DataFrame.from_records(records)
    for col in TABLE_COLUMNS:
        if col not in table:
            table[col] = np.nan if col not in ("status", "error", "hesd_type", "name", "checkpoint") else None
    ok = table["status"] == "ok"
    table["qs_flag"] = False
    table["qs_reason"] = ""
    if ok.any():
        okt = table[ok]
        qs = settings.qs.apply(
            okt["lambda_max"].tolist(), okt["width"].tolist(), [spectra[c] for c in okt["checkpoint"]]
        )
        for key in ("qs_lambda_ratio", "qs_width_ratio", "qs_zero_mass", "qs_flag", "qs_reason"):
            table.loc[ok, key] = [q[key] for q in qs]
    table["qs_flag"] = table["qs_flag"].astype(bool)
    ordered = [c for c in TABLE_COLUMNS if c in table] + [c for c in table.columns if c not in TABLE_COLUMNS]
    table = table[ordered]
    selections = select_all(table, rules if rules is not None else default_rules(settings.ct_threshold))
    return table, selections, spectra


def analyze_checkpoints(
    model_factory: Callable[[], nn.Module],
    checkpoints: str | Path | Iterable[str | Path],
    data: Any,
    *,
    loss_fn: Callable = nn.functional.cross_entropy,
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
        model_factory: returns a fresh ``nn.Module`` of the checkpoints' architecture.
        checkpoints: files, folders or glob patterns; ordered by the epoch or step parsed
            from their names (``epoch_012.pt``), or by ``epochs``.
        data: training data (see :class:`hesd.HessianOperator`).
        loss_fn: loss (default cross-entropy).
        heldout: held-out data: loss and accuracy are recorded per checkpoint.
        evaluate: ``evaluate(model) -> {"accuracy": ..., ...}`` instead of the default held-out evaluation.
        out_dir: results folder (durable, resumable); ``None`` keeps everything in memory.
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

    Example:
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
    from ..distributed import broadcast, consensus, rank_and_world, resolve_group

    s = settings or AnalysisSettings()
    if parallel not in ("data", "checkpoints"):
        raise ValueError(f"analyze_checkpoints: parallel must be 'data' or 'checkpoints', got {parallel!r}")
    group = resolve_group(process_group)
    rank, world = rank_and_world(group)
    infos = discover_checkpoints(checkpoints, epochs)
    store, error = None, None
    if out_dir is not None and rank == 0:
        try:
            store = ResultStore(out_dir, {"analysis": s.to_dict(), "hesd": __version__}, overwrite=overwrite)
        except Exception as exc:
            error = exc
    if group is not None:
        msg = consensus(group, error)
        if msg is not None:
            raise error if error is not None else RuntimeError(f"analyze_checkpoints: rank 0 failed: {msg}")
    elif error is not None:
        raise error
    # Rank 0's stored rows decide what is resumed, identically on every rank.
    cached = broadcast({r["checkpoint"]: r for r in store.rows()} if store is not None else {}, group)
    if progress:
        progress("start", infos)
    model = model_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"analyze_checkpoints: model_factory returned {type(model).__name__}, not an nn.Module")
    if s.dtype is not None:
        model = model.to(getattr(torch, s.dtype))
    if s.device is not None:
        model = model.to(s.device)
    rows: list[dict] = []
    split = parallel == "checkpoints" and group is not None
    step = world if split else 1
    for start in range(0, len(infos), step):
        chunk = infos[start : start + step]
        if split:
            mine = chunk[rank] if rank < len(chunk) else None
            row = _analyze_one(model, mine, data, loss_fn, heldout, evaluate, s, cached, trust_pickle, progress,
                               None) if mine is not None else None  # fmt: skip
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, row, group=group)
            new_rows = [r for r in gathered if r is not None]
        else:
            new_rows = [_analyze_one(model, chunk[0], data, loss_fn, heldout, evaluate, s, cached, trust_pickle,
                                     progress, group)]  # fmt: skip
        for row in new_rows:
            is_new = row.pop("_new", False)
            rows.append(row)
            if store is not None and is_new:
                store.put(ResultStore.key_for(row["checkpoint"]), row)
        if store is not None:  # the tables on disk follow every finished checkpoint
            table, selections, _ = build_table(rows, s, rules)
            store.write_tables(_records(table))
            store.write_json("selection.json", selections)
    table, selections, spectra = build_table(rows, s, rules)
    failed = [(r["checkpoint"], r["error"]) for r in rows if r["status"] != "ok"]
    return SeriesResult(table, selections, spectra, failed, Path(out_dir) if out_dir else None, s)


def _records(table: pd.DataFrame) -> list[dict]:
    return table.replace({np.nan: None}).to_dict(orient="records")


def _analyze_one(
    model, info: CheckpointInfo, data, loss_fn, heldout, evaluate, s, cached, trust_pickle, progress, group=None
):
    """Analyse one checkpoint; a row marked ``_new`` is to be stored (cached rows are not)."""
    from ..distributed import consensus

    ident = str(info.path)
    base = {"checkpoint": ident, "name": info.name, "epoch": info.epoch}
    error: BaseException | None = None
    digest = None
    try:
        digest = sha256_file(info.path)
    except OSError as exc:
        error = CheckpointError(f"{info.path}: cannot read ({exc.strerror})")
    base["sha256"] = digest
    prev = cached.get(ident)
    reuse = error is None and prev is not None and prev.get("status") == "ok" and prev.get("sha256") == digest
    if group is not None:  # every rank must take the same branch, or the collectives below would deadlock
        reuse = consensus(group, None if reuse else RuntimeError("recompute")) is None
    if reuse:
        if progress:
            progress("cached", prev)
        return prev
    if progress:
        progress("checkpoint", info)
    if error is None:
        try:
            state = load_state_dict(info.path, trust_pickle=trust_pickle)
            apply_state_dict(model, state, info.path)
        except (HesdError, FileNotFoundError, ValueError, TypeError, RuntimeError) as exc:
            error = exc
    message = consensus(group, error) if group is not None else (
        None if error is None else f"{type(error).__name__}: {error}")  # fmt: skip
    if message is not None:
        row = {**base, "status": "failed", "error": message, "_new": True}
    else:
        try:
            cb = (lambda p, j: progress("step", (p, j))) if progress else None
            row, spec = analyze_model(model, data, loss_fn=loss_fn, heldout=heldout, evaluate=evaluate, settings=s,
                                      callback=cb, process_group=group)  # fmt: skip
            row = {**base, **row, "status": "ok", "error": None, "spectrum": spec.to_dict(), "_new": True}
        except (HesdError, FileNotFoundError, ValueError, TypeError, RuntimeError) as exc:
            row = {**base, "status": "failed", "error": f"{type(exc).__name__}: {exc}", "_new": True}
    if progress:
        progress("done", row)
    return row
