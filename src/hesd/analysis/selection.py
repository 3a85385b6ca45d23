"""Quasi-singular (QS) detection over a series, and checkpoint selection rules.

Every rule validates its settings at construction and returns a :class:`Selection` —
the chosen checkpoint (or ``None``) *and the reason* — in the manner of Lightning's
``EarlyStopping``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..algorithms.spectrum import Spectrum
from ..errors import HesdTypeError, HesdValueError
from .criteria import zero_mass
from .evidence import reliability

__all__ = [
    "BestHeldout",
    "ExtremeOf",
    "HighestCtAmongMP",
    "QSRule",
    "Selection",
    "SelectionRule",
    "SmallestLambdaMax",
    "default_rules",
    "select_all",
]


@dataclass(frozen=True)
class QSRule:
    r"""When is a checkpoint's HESD quasi-singular (QS)?

    No formula is published (arXiv 2504.17618 describes eigenvalues collapsing toward
    zero with excessive training, λmax falling with no gain in generalisation). hesd's
    explicit, configurable rule: checkpoint :math:`t` is QS when all three hold, with
    peaks taken over the checkpoints up to and including :math:`t` (so the flag never
    depends on the future):

    1. :math:`\lambda_{\max}(t) \le` ``lambda_frac`` × peak :math:`\lambda_{\max}`;
    2. spectral width :math:`\lambda_{\max} - \lambda_{\min} \le` ``width_frac`` × peak width;
    3. the share of spectral mass with :math:`|\lambda| \le` ``band_frac`` × peak
       :math:`\lambda_{\max}` is at least ``mass_level``.

    The raw quantities (``lambda_max``, ``width``, ``qs_zero_mass``, ``qs_lambda_ratio``,
    ``qs_width_ratio``) are exposed in the results table so users can apply their own rule.
    """

    lambda_frac: float = 0.5
    width_frac: float = 0.5
    mass_level: float = 0.9
    band_frac: float = 0.05

    def __post_init__(self) -> None:
        for name in ("lambda_frac", "width_frac", "mass_level", "band_frac"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise HesdValueError(f"QSRule: {name} must be in (0, 1], got {v!r}")

    def apply(
        self, lambda_max: Sequence[float], width: Sequence[float], spectra: Sequence[Spectrum]
    ) -> list[dict[str, float | bool | str]]:
        """Per checkpoint (in series order): the QS quantities, the flag and the reason."""
        out: list[dict[str, float | bool | str]] = []
        peak_l, peak_w = -math.inf, -math.inf
        for lmax, wid, spec in zip(lambda_max, width, spectra, strict=True):
            peak_l, peak_w = max(peak_l, lmax), max(peak_w, wid)
            lr = lmax / peak_l if peak_l > 0 else math.nan
            wr = wid / peak_w if peak_w > 0 else math.nan
            mass = zero_mass(spec, self.band_frac * peak_l) if peak_l > 0 else math.nan
            flag = bool(lr <= self.lambda_frac and wr <= self.width_frac and mass >= self.mass_level)
            reason = (
                f"λmax at {lr:.0%} of its peak (≤ {self.lambda_frac:.0%}), "
                f"width at {wr:.0%} (≤ {self.width_frac:.0%}), "
                f"{mass:.0%} of spectral mass within ±{self.band_frac:g}·peak λmax (≥ {self.mass_level:.0%})"
            )
            out.append(
                {"qs_lambda_ratio": lr, "qs_width_ratio": wr, "qs_zero_mass": mass, "qs_flag": flag,
                 "qs_reason": reason if flag else ""}
            )  # fmt: skip
        return out


@dataclass(frozen=True)
class Selection:
    """A rule's decision: the chosen checkpoint (``None`` if it declines) and why."""

    rule: str
    checkpoint: str | None
    epoch: int | None
    reason: str

    def __iter__(self):  # allows ``decision, reason = rule.select(table)``
        yield self.checkpoint
        yield self.reason


class SelectionRule:
    """Base class: ``select(table) -> Selection`` on an analysis results table."""

    name = "rule"
    #: whether the rule reads curvature (it then skips checkpoints whose HESD type is undetermined)
    uses_curvature = True

    def __init__(self, skip_initial: bool = True) -> None:
        if not isinstance(skip_initial, bool):
            raise HesdTypeError(f"{type(self).__name__}: skip_initial must be a bool")
        self.skip_initial = skip_initial

    def candidates(self, table: pd.DataFrame) -> pd.DataFrame:
        """The rows a rule may pick: analysed, not the initialisation (if so set), type determined.

        A rule on curvature (``uses_curvature``) skips undetermined HESD types. A row is the
        initialisation when its ``initial`` column says so (set from the checkpoint's
        name: ``epoch_000.pt`` is, Lightning's ``epoch=0-step=10.ckpt`` is not); rows without
        that column (stored by hesd before 0.3) fall back to ``epoch == 0``.
        """
        t = self._trained(table)
        if self.uses_curvature and "hesd_type" in t:
            t = t[t["hesd_type"] != "undetermined"]
        return t

    def _trained(self, table: pd.DataFrame) -> pd.DataFrame:
        """The analysed rows, without the initial checkpoint if so set (whatever their HESD type)."""
        t = table[table["status"] == "ok"] if "status" in table else table
        if not self.skip_initial:
            return t
        if "initial" in t and t["initial"].notna().any():
            return t[~t["initial"].fillna(False).astype(bool)]
        if "epoch" in t:
            t = t[~(t["epoch"] == 0)]
        return t

    def nothing_to_choose(self, table: pd.DataFrame) -> str:
        """Why :meth:`candidates` is empty, in words: no analysed row, only the initialisation, undetermined types."""
        ok = table[table["status"] == "ok"] if "status" in table else table
        if ok.empty:
            return "no successfully analysed checkpoint to choose from"
        trained = self._trained(ok)
        if trained.empty:
            names = ", ".join(str(n) for n in ok["name"]) if "name" in ok else "epoch 0"
            return (f"only the initialisation ({names}) was analysed, and the rules skip it on purpose: it is not a "
                    "trained checkpoint (SelectionRule(skip_initial=False) includes it)")  # fmt: skip
        reasons = trained["type_reason"].dropna() if "type_reason" in trained else pd.Series(dtype=str)
        return f"every analysed checkpoint's HESD type is undetermined ({reasons.iloc[0] if len(reasons) else '?'})"

    def select(self, table: pd.DataFrame) -> Selection:  # pragma: no cover - abstract
        """The rule's pick from ``table`` and the reason for it."""
        raise NotImplementedError

    @staticmethod
    def _pick(rule: str, row: pd.Series, reason: str) -> Selection:
        epoch = row.get("epoch")
        epoch = None if epoch is None or (isinstance(epoch, float) and math.isnan(epoch)) else int(epoch)
        return Selection(rule, str(row["checkpoint"]), epoch, reason)


class HighestCtAmongMP(SelectionRule):
    """The paper's rule: among mainly-positive checkpoints (Ct > threshold), the highest Ct.

    Args:
        ct_threshold: MP threshold (default −0.6).
        exclude_qs: also skip checkpoints flagged quasi-singular.
        skip_initial: ignore epoch 0 (the initialisation is not a trained model).

    When no checkpoint is MP the rule declines (``checkpoint=None``): curvature-based
    selection does not apply to MN-HESDs.
    """

    name = "highest_ct_mp"

    def __init__(self, ct_threshold: float = -0.6, exclude_qs: bool = False, skip_initial: bool = True) -> None:
        super().__init__(skip_initial)
        if not (isinstance(ct_threshold, (int, float)) and -math.inf < ct_threshold <= 0):
            raise HesdValueError(f"HighestCtAmongMP: ct_threshold must be a number ≤ 0, got {ct_threshold!r}")
        self.ct_threshold = float(ct_threshold)
        self.exclude_qs = exclude_qs

    def select(self, table: pd.DataFrame) -> Selection:
        """The rule's pick from ``table`` and the reason for it."""
        t = self.candidates(table)
        if t.empty:
            return Selection(self.name, None, None, self.nothing_to_choose(table))
        mp = t[t["ct"] > self.ct_threshold]
        if self.exclude_qs and "qs_flag" in mp:
            mp = mp[~mp["qs_flag"].astype(bool)]
        if mp.empty:
            return Selection(
                self.name, None, None,
                f"no checkpoint is mainly positive (every Ct ≤ {self.ct_threshold}, best {t['ct'].max():.3f}): "
                "the HESDs are MN, so curvature-based selection does not apply; choose on held-out data instead",
            )  # fmt: skip
        row = mp.loc[mp["ct"].idxmax()]
        return self._pick(
            self.name, row,
            f"highest Ct = {row['ct']:.4f} among {len(mp)} MP checkpoint(s) (Ct > {self.ct_threshold}) of {len(t)}",
        )  # fmt: skip


class SmallestLambdaMax(SelectionRule):
    """The classic baseline: the flattest checkpoint, smallest λmax."""

    name = "smallest_lambda_max"

    def select(self, table: pd.DataFrame) -> Selection:
        """The rule's pick from ``table`` and the reason for it."""
        t = self.candidates(table)
        if t.empty:
            return Selection(self.name, None, None, self.nothing_to_choose(table))
        row = t.iloc[int(np.argmin(t["lambda_max"].to_numpy(dtype=float)))]
        return self._pick(self.name, row, f"smallest λmax = {row['lambda_max']:.5g} of {len(t)} checkpoints")


class ExtremeOf(SelectionRule):
    """The checkpoint with the smallest (or largest) value of one measure — a column of the table.

    The model-zoo study (docs/evidence.md) scores such rules by their regret. The best it found on
    its tuning half (largest parameter norm) did no better than keeping the last checkpoint, so
    none is a default rule; pass one in ``rules=`` to select on a measure and see its pick beside
    the others.

    Args:
        column: the table's column (``"lambda_max"``, ``"trace"``, ``"neg_mass"``, …).
        mode: ``"min"`` or ``"max"``.
        curvature: whether the column is a curvature measure (then undetermined HESDs are skipped).
        skip_initial: skip the initialisation.

    Examples:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"checkpoint": ["a", "b"], "epoch": [1, 2], "status": ["ok", "ok"],
        ...                   "trace": [5.0, 3.0]})
        >>> ExtremeOf("trace").select(t).checkpoint, ExtremeOf("trace").name
        ('b', 'smallest_trace')
    """

    def __init__(self, column: str, mode: str = "min", curvature: bool = True, skip_initial: bool = True) -> None:
        super().__init__(skip_initial)
        if mode not in ("min", "max"):
            raise HesdValueError(f"ExtremeOf: mode must be 'min' or 'max', got {mode!r}")
        self.column, self.mode, self.uses_curvature = column, mode, curvature
        self.name = f"{'smallest' if mode == 'min' else 'largest'}_{column}"

    def select(self, table: pd.DataFrame) -> Selection:
        """The rule's pick from ``table`` and the reason for it."""
        t = self.candidates(table)
        if t.empty:
            return Selection(self.name, None, None, self.nothing_to_choose(table))
        if self.column not in t or t[self.column].isna().all():
            return Selection(self.name, None, None, f"no {self.column} recorded")
        t = t[t[self.column].notna()]
        vals = t[self.column].to_numpy(dtype=float)
        row = t.iloc[int(np.argmin(vals) if self.mode == "min" else np.argmax(vals))]
        word = "smallest" if self.mode == "min" else "largest"
        return self._pick(self.name, row, f"{word} {self.column} = {row[self.column]:.5g} of {len(t)} checkpoints")


class BestHeldout(SelectionRule):
    """The oracle: best held-out metric (only when held-out metrics were recorded).

    By default the highest ``heldout_accuracy``; where no accuracy was recorded (a language
    model, a regression, a model with structured outputs) the lowest ``heldout_loss``. The
    reason names the metric used.
    """

    name = "best_heldout"
    uses_curvature = False

    def __init__(self, metric: str | None = None, mode: str | None = None, skip_initial: bool = True) -> None:
        super().__init__(skip_initial)
        if mode not in (None, "max", "min"):
            raise HesdValueError(f"BestHeldout: mode must be 'max' or 'min', got {mode!r}")
        self.metric, self.mode = metric, mode

    def _metric(self, t: pd.DataFrame) -> tuple[str, str]:
        if self.metric is not None:
            return self.metric, self.mode or ("min" if self.metric.endswith("loss") else "max")
        if "heldout_accuracy" in t and t["heldout_accuracy"].notna().any():
            return "heldout_accuracy", "max"
        return "heldout_loss", "min"

    def select(self, table: pd.DataFrame) -> Selection:
        """The rule's pick from ``table`` and the reason for it."""
        t = self.candidates(table)
        if t.empty:
            return Selection(self.name, None, None, self.nothing_to_choose(table))
        metric, mode = self._metric(t)
        if metric not in t or t[metric].isna().all():
            return Selection(self.name, None, None, f"no {metric} recorded (pass held-out data)")
        t = t[t[metric].notna()]
        idx = t[metric].idxmax() if mode == "max" else t[metric].idxmin()
        row = t.loc[idx]
        return self._pick(self.name, row, f"{'highest' if mode == 'max' else 'lowest'} {metric} = "
                          f"{row[metric]:.4f}")  # fmt: skip


def default_rules(ct_threshold: float = -0.6) -> list[SelectionRule]:
    """The paper's rule, the classic baseline and the held-out oracle."""
    return [HighestCtAmongMP(ct_threshold), SmallestLambdaMax(), BestHeldout()]


def _skipped_note(rule: SelectionRule, ok: pd.DataFrame) -> str:
    """``"; the initialisation (NAME) is not a candidate"`` when the rule skipped one."""
    if not rule.skip_initial or "initial" not in ok or not ok["initial"].fillna(False).astype(bool).any():
        return ""
    names = ok.loc[ok["initial"].fillna(False).astype(bool), "name" if "name" in ok else "checkpoint"]
    return f"; the initialisation ({', '.join(map(str, names))}) is not a candidate"


def select_all(table: pd.DataFrame, rules: Sequence[SelectionRule]) -> dict[str, dict]:
    """Apply each rule; when held-out accuracy is present, report each pick's gap to the best."""
    out: dict[str, dict] = {}
    best, metric = None, None
    ok = table[table["status"] == "ok"] if "status" in table else table
    pool = BestHeldout().candidates(ok)  # the best the oracle can pick: the initialisation is not a candidate
    for key, better in (("heldout_accuracy", np.nanmax), ("heldout_loss", np.nanmin)):
        if key in pool and pool[key].notna().any():
            best, metric = float(better(pool[key].to_numpy(dtype=float))), key
            break
    for rule in rules:
        sel = rule.select(table)
        note = _skipped_note(rule, ok) if sel.checkpoint else ""  # an empty pick's reason says it already
        entry: dict[str, Any] = {"rule": sel.rule, "checkpoint": sel.checkpoint, "epoch": sel.epoch,
                                 "reason": sel.reason + note}  # fmt: skip
        measured = reliability(sel.rule)
        if measured is not None:  # how much weight such a pick deserved in the zoo study
            entry["reliability"] = measured
        if best is not None and metric is not None and sel.checkpoint is not None:
            value = float(table.loc[table["checkpoint"] == sel.checkpoint, metric].iloc[0])
            entry[metric] = value
            entry["gap_metric"] = metric
            # how much worse than the best checkpoint: accuracy points lost, or held-out loss added
            entry["gap_to_best"] = best - value if metric == "heldout_accuracy" else value - best
        out[sel.rule] = entry
    return out
