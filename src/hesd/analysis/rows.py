"""One definition of a results row: its columns, how a row is made, and the table built from rows.

Every checkpoint analysed (by :func:`hesd.analyze_checkpoints`, :class:`hesd.Monitor` or a
callback) becomes one row: a JSON-ready dict whose keys are the :data:`COLUMNS` below (plus
extras such as the stored spectrum, or ``heldout_*`` metrics a user's ``evaluate`` returns).
Interfaces show named subsets of them (:data:`VIEWS`); nothing else lists column names.

Examples:
    >>> from hesd.analysis.rows import RowIdentity, VIEWS
    >>> RowIdentity("runs/epoch_3.pt", "epoch_3.pt", 3).failed("CheckpointError: corrupt")["status"]
    'failed'
    >>> VIEWS["scalars"]
    ('lambda_max', 'lambda_min', 'trace', 're', 'kh05', 'ct')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..algorithms.spectrum import Spectrum
from .selection import SelectionRule, default_rules, select_all
from .settings import AnalysisSettings

__all__ = [
    "COLUMNS",
    "TABLE_COLUMNS",
    "TEXT_COLUMNS",
    "VIEWS",
    "Column",
    "RowIdentity",
    "build_table",
    "check_row",
    "records",
    "series_order",
    "trace_text",
]


@dataclass(frozen=True)
class Column:
    """A column of the results table.

    Attributes:
        name: the key in rows and the column name in ``results.csv``.
        description: what it holds, for the report and the docs.
        text: whether it holds text (missing values are ``None``, not NaN).
    """

    name: str
    description: str
    text: bool = False


COLUMNS: tuple[Column, ...] = (
    Column("checkpoint", "the checkpoint's path (its identity in the store)", True),
    Column("name", "the checkpoint's file name", True),
    Column("epoch", "epoch or step parsed from the name (or given; a Trainer folder's global_step)"),
    Column("train_epoch", "training epoch a Trainer folder's trainer_state.json records"),
    Column("initial", "the checkpoint is the initialisation (selection rules skip it)"),
    Column("status", "'ok' or 'failed'", True),
    Column("lambda_min", "smallest Hessian eigenvalue (certified by restarted Lanczos)"),
    Column("lambda_max", "largest Hessian eigenvalue (certified by restarted Lanczos)"),
    Column("trace", "SLQ estimate of the Hessian's trace"),
    Column("trace_se", "its standard error over probes"),
    Column("re", "|min λ / max λ| on the raw Ritz values, mean over probes"),
    Column("re_std", "spread of re over probes"),
    Column("kh05", "Σ_{λ<0}|λw|^0.5 / Σ_{λ>0}(λw)^0.5, mean over probes"),
    Column("kh05_std", "spread of kh05 over probes"),
    Column("ct", "min(λ_neg) / max(λ_pos), mean over probes (equals −re when both signs occur)"),
    Column("ct_std", "spread of ct over probes"),
    Column("hesd_type", "MP (Ct above the threshold: curvature analysis applies), MN, or undetermined", True),
    Column("type_reason", "why the type is undetermined (a numerically zero Hessian, too few steps)", True),
    Column("qs_flag", "quasi-singular: eigenvalues collapsed toward zero (hesd.QSRule)"),
    Column("qs_lambda_ratio", "λmax over its running peak"),
    Column("qs_width_ratio", "spectral width over its running peak"),
    Column("qs_zero_mass", "share of spectral mass near zero"),
    Column("width", "λmax − λmin"),
    Column("neg_mass", "share of spectral mass on negative Ritz values"),
    Column("stable_step", "2 / λmax"),
    Column("eos_ratio", "η·λmax/2 (edge of stability at 1), with the learning rate given"),
    Column("train_loss", "loss over the analysis data"),
    Column("grad_norm", "norm of its gradient"),
    Column("param_norm", "norm of the analysed parameters"),
    Column("dist_init", "distance of the analysed parameters from the series' initial checkpoint"),
    Column("sharpness_random", "mean loss rise under random perturbations of 5 % of each parameter"),
    Column("heldout_loss", "loss on the held-out data"),
    Column("heldout_accuracy", "accuracy on the held-out data (classification)"),
    Column("hvps", "Hessian-vector products used"),
    Column("seconds", "wall time of the analysis"),
    Column("sha256", "hash of the checkpoint file", True),
    Column("error", "why the checkpoint failed", True),
)

TABLE_COLUMNS: list[str] = [c.name for c in COLUMNS]
TEXT_COLUMNS: frozenset[str] = frozenset(c.name for c in COLUMNS if c.text)

#: the spectrum's headline numbers, in the order every view shows them
HEADLINE: tuple[str, ...] = ("lambda_min", "lambda_max", "trace", "re", "kh05", "ct", "hesd_type")

_COSTS = ("train_loss", "hvps", "seconds")

#: named subsets of the columns that interfaces show
VIEWS: dict[str, tuple[str, ...]] = {
    # ``hesd analyze``'s printed table
    "summary": ("name", "epoch", *HEADLINE, "qs_flag", "heldout_accuracy", "status"),
    # ``hesd spectrum``'s printed summary
    "spectrum": ("lambda_min", "lambda_max", "trace", "trace_se", *HEADLINE[3:], "train_loss", "hvps"),
    # the demo's printed table (no trace: the demo's SLQ is short)
    "demo": ("epoch", "lambda_min", "lambda_max", *HEADLINE[3:], "qs_flag", "heldout_accuracy"),
    # the report's results table
    "report": ("name", "epoch", "status", *HEADLINE, "qs_flag", "heldout_accuracy", *_COSTS, "error"),
    # TensorBoard scalars
    "scalars": ("lambda_max", "lambda_min", "trace", "re", "kh05", "ct"),
    # one row per block of :func:`hesd.analysis.analyze_blocks`
    "blocks": ("lambda_min", "lambda_max", *HEADLINE[3:]),
}

_NOT_IN_TABLE = ("spectrum", "heldout_spectrum", "per_probe")


#: the values ``hesd_type`` may hold (``undetermined``: a spectrum no verdict can be read from)
HESD_TYPES: tuple[str, ...] = ("MP", "MN", "undetermined")

_COLUMN_BY_NAME = {c.name: c for c in COLUMNS}
_JSON_SCALARS = (str, int, float, bool, type(None))


def check_row(row: Any) -> str:
    """What is wrong with a row read back from a results folder ("" when nothing).

    Rows are shared between people with their folders, and their values reach the report and
    the selection rules: each known column must hold its kind of value (text or a number),
    ``status`` and ``hesd_type`` one of their values, and every other key plain JSON.

    Examples:
        >>> check_row({"checkpoint": "a.pt", "status": "ok", "hesd_type": "MP", "ct": -0.1})
        ''
        >>> check_row({"checkpoint": "a.pt", "status": "ok", "hesd_type": "<script>"})
        "hesd_type is '<script>', not one of MP, MN, undetermined"
    """
    if not isinstance(row, dict):
        return f"a {type(row).__name__}, not an object"
    if not isinstance(row.get("checkpoint"), str):
        return "no checkpoint path"
    if row.get("status") not in ("ok", "failed"):
        return f"status is {str(row.get('status'))[:40]!r}, not 'ok' or 'failed'"
    if row.get("hesd_type") not in (*HESD_TYPES, None):
        return f"hesd_type is {str(row['hesd_type'])[:40]!r}, not one of {', '.join(HESD_TYPES)}"
    for key, value in row.items():
        col = _COLUMN_BY_NAME.get(key)
        if col is not None and value is not None:
            ok = isinstance(value, str) if col.text else isinstance(value, (int, float, bool))
            if not ok:
                kind = "text" if col.text else "a number"
                return f"{key} holds {type(value).__name__} {str(value)[:40]!r}, not {kind}"
        elif col is None and not isinstance(value, (*_JSON_SCALARS, list, dict)):
            return f"{key} holds {type(value).__name__}"  # pragma: no cover - json.loads makes only these
    return ""


def trace_text(trace: Any, se: Any) -> str | None:
    """``"28.01 ± 0.61"``: the SLQ trace with its standard error (never shown bare); ``None`` without a finite error.

    Examples:
        >>> trace_text(28.0123, 0.6061), trace_text(28.0, float("nan"))
        ('28.01 ± 0.61', None)
    """
    if se is None or not np.isfinite(se):
        return None
    return f"{trace:.4g} ± {se:.2g}"


def series_order(row: dict) -> tuple:
    """The sort key of a row in its series: by epoch (or step), rows without one last, then by name.

    The one order of every table and report built from a results folder, whichever invocation
    wrote which row.
    """
    e = row.get("epoch")
    return (e is None, e if e is not None else 0, str(row.get("name", "")))


@dataclass(frozen=True)
class RowIdentity:
    """What names a row before anything is computed.

    Attributes:
        checkpoint: the checkpoint's identity (resolved path, or ``monitor:epoch=N``).
        name: its display name.
        epoch: epoch or step, if known.
        sha256: the file's hash, if there is a file.
        initial: the checkpoint is the initialisation (default: ``epoch == 0``).
    """

    checkpoint: str
    name: str
    epoch: int | None = None
    sha256: str | None = None
    initial: bool | None = None

    def base(self) -> dict[str, Any]:
        """The identity as row keys."""
        initial = self.initial if self.initial is not None else self.epoch == 0
        return {"checkpoint": self.checkpoint, "name": self.name, "epoch": self.epoch, "sha256": self.sha256,
                "initial": bool(initial)}  # fmt: skip

    def failed(self, error: str) -> dict[str, Any]:
        """A failed row with ``error`` (``"Type: message"``)."""
        return {**self.base(), "status": "failed", "error": error}

    def ok(self, metrics: dict[str, Any], spectrum: Spectrum) -> dict[str, Any]:
        """A finished row: the metrics of :func:`hesd.analyze_model` and the spectrum to store."""
        return {**self.base(), **metrics, "status": "ok", "error": None, "spectrum": spectrum.to_dict()}


def build_table(
    rows: list[dict], settings: AnalysisSettings, rules: list[SelectionRule] | None = None
) -> tuple[pd.DataFrame, dict[str, dict], dict[str, Spectrum]]:
    """Assemble the tidy table from stored rows (series order), add QS flags, apply the rules.

    Returns:
        ``(table, selections, spectra)``: one row per checkpoint with :data:`TABLE_COLUMNS`
        first, each rule's pick with its reason, and the SLQ spectrum per checkpoint.
    """
    spectra: dict[str, Spectrum] = {}
    table = pd.DataFrame.from_records([{k: v for k, v in r.items() if k not in _NOT_IN_TABLE} for r in rows])
    for r in rows:
        if r.get("spectrum"):
            spectra[r["checkpoint"]] = Spectrum.from_dict(r["spectrum"])
    for col in TABLE_COLUMNS:
        if col not in table:
            table[col] = None if col in TEXT_COLUMNS else np.nan
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
    ordered = TABLE_COLUMNS + [c for c in table.columns if c not in TABLE_COLUMNS]
    table = table[ordered]
    selections = select_all(table, rules if rules is not None else default_rules(settings.ct_threshold))
    return table, selections, spectra


def records(table: pd.DataFrame) -> list[dict]:
    """The table as JSON-ready records (NaN as ``None``)."""
    return table.replace({np.nan: None}).to_dict(orient="records")
