"""What to keep, in one sentence, and how much to trust it: the decision a report leads with.

:func:`decide` reads a series' table and its rules' picks (:mod:`hesd.analysis.selection`) and
returns a :class:`Decision`: the checkpoint to keep and why, how far each rule's pick is from the
best held-out checkpoint (graded), and plain warnings where the evidence is weak. It computes
nothing new and writes nothing; the report and the command line render it.

Grades of a pick against the best held-out checkpoint: ``"good"`` within 1 accuracy point (or
1 % of the best held-out loss), ``"fair"`` within 5 points (5 %), ``"poor"`` beyond, and
``"unknown"`` without held-out data.

Examples:
    >>> import pandas as pd
    >>> from hesd.analysis.decision import decide
    >>> t = pd.DataFrame({"checkpoint": ["a", "b"], "name": ["a", "b"], "epoch": [1, 2], "status": ["ok", "ok"],
    ...                   "hesd_type": ["MP", "MP"], "qs_flag": [False, False]})
    >>> pick = {"checkpoint": "b", "epoch": 2, "reason": "r", "gap_to_best": 0.0, "gap_metric": "heldout_accuracy",
    ...         "heldout_accuracy": 0.97}
    >>> d = decide(t, {"highest_ct_mp": pick, "smallest_lambda_max": pick, "best_heldout": pick})
    >>> d.keep, d.grades["highest_ct_mp"], d.warnings
    ('b', 'good', [])
    >>> d.sentence.split("; ")[1]
    'held-out accuracy 0.97, the best of the series.'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["Decision", "decide", "gap_text", "grade", "series_unit"]

_RULES = {"highest_ct_mp": "the paper's rule (highest Ct among MP checkpoints)",
          "smallest_lambda_max": "the classic rule (smallest λmax)"}  # fmt: skip


@dataclass
class Decision:
    """A series' decision.

    Attributes:
        keep: the name of the checkpoint to keep, or ``None`` when no curvature rule picks one.
        sentence: what to keep and why, with its distance from the best held-out checkpoint.
        grades: per rule, ``"good"``, ``"fair"``, ``"poor"`` or ``"unknown"`` (module docs).
        flags: per rule, what is wrong with its pick (quasi-singular, MN), explained.
        warnings: where the evidence is weak, in plain words.
    """

    keep: str | None
    sentence: str
    grades: dict[str, str] = field(default_factory=dict)
    flags: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def series_unit(table: pd.DataFrame) -> str:
    """``"step"`` when every checkpoint is step-numbered (``checkpoint-500``, ``step_*``), else ``"epoch"``."""
    names = [str(n) for n in table["name"]] if "name" in table else []
    if names and all(re.search(r"(?:checkpoint-|step[=_-]?)\d+", n) for n in names):
        return "step"
    return "epoch"


def grade(entry: dict[str, Any]) -> str:
    """The grade of one rule's pick from its ``gap_to_best`` (module docs)."""
    gap = entry.get("gap_to_best")
    if gap is None or entry.get("checkpoint") is None:
        return "unknown"
    if entry.get("gap_metric") == "heldout_loss":
        best = entry["heldout_loss"] - gap
        rel = gap / abs(best) if best else float("inf")
        return "good" if rel <= 0.01 else ("fair" if rel <= 0.05 else "poor")
    return "good" if gap <= 0.01 else ("fair" if gap <= 0.05 else "poor")


def gap_text(entry: dict[str, Any]) -> str:
    """A pick's distance from the series' best held-out checkpoint, in words ("" when unmeasured).

    The one wording the decision sentence, the report's pick boxes and ``hesd analyze``'s summary
    share.
    """
    if entry.get("gap_to_best") is None:
        return ""
    metric = "held-out loss" if entry.get("gap_metric") == "heldout_loss" else "held-out accuracy"
    if entry["gap_to_best"] == 0:
        return f"{metric} {entry[entry['gap_metric']]:.4g}, the best of the series"
    if entry.get("gap_metric") == "heldout_loss":
        return f"held-out loss {entry['heldout_loss']:.4g}, {entry['gap_to_best']:+.3g} above the best checkpoint's"
    return f"held-out accuracy {entry['heldout_accuracy']:.4g}, {100 * entry['gap_to_best']:.2f} points below the best"


def _row(table: pd.DataFrame, checkpoint: str) -> pd.Series | None:
    rows = table[table["checkpoint"] == checkpoint]
    return None if rows.empty else rows.iloc[0]


def decide(table: pd.DataFrame, selections: dict[str, dict[str, Any]], unit: str = "epoch") -> Decision:
    """The decision for one series (module docs)."""
    name = lambda e: Path(str(e["checkpoint"])).name  # noqa: E731
    grades = {r: grade(e) for r, e in selections.items() if r in _RULES}
    flags: dict[str, list[str]] = {}
    for rule, entry in selections.items():
        if rule not in _RULES or entry.get("checkpoint") is None:
            continue
        row = _row(table, entry["checkpoint"])
        notes = []
        if row is not None and bool(row.get("qs_flag", False)):
            notes.append("quasi-singular: its eigenvalues collapsed toward zero, where λmax stops tracking "
                         "generalisation (the paper's QS-HESD); prefer a held-out check")  # fmt: skip
        if row is not None and row.get("hesd_type") == "MN":
            notes.append("MN (mainly negative): curvature-based analysis does not apply to this checkpoint")
        if notes:
            flags[rule] = notes
    paper, classic = selections.get("highest_ct_mp", {}), selections.get("smallest_lambda_max", {})
    best = selections.get("best_heldout", {})
    warnings = []
    if paper.get("checkpoint"):
        keep = name(paper)
        sentence = f"Keep {keep} ({unit} {paper.get('epoch')}): {_RULES['highest_ct_mp']}"
        gap = gap_text(paper)
    elif classic.get("checkpoint"):
        keep = None
        sentence = (f"No checkpoint is mainly positive, so curvature-based selection does not apply; "
                    f"{_RULES['smallest_lambda_max']} would pick {name(classic)}")  # fmt: skip
        gap = gap_text(classic)
        warnings.append("every checkpoint is MN: choose on held-out data")
    else:
        failed = int((table["status"] != "ok").sum()) if "status" in table else 0
        why = classic.get("reason") or "no successfully analysed checkpoint to choose from"
        return Decision(None, f"Nothing to choose: {why}.", grades, flags,
                        [f"{failed} checkpoint(s) failed: see the errors in the table"] if failed else [])  # fmt: skip
    sentence += f"; {gap}." if gap else "."
    if not best.get("checkpoint"):
        warnings.append("no held-out data: the picks cannot be checked against generalisation (pass --heldout)")
    elif keep is not None and best.get("checkpoint") != paper.get("checkpoint"):
        sentence += f" The best held-out checkpoint is {name(best)}."
    if paper.get("checkpoint") and classic.get("checkpoint") and paper["checkpoint"] != classic["checkpoint"]:
        warnings.append(f"the paper's rule and smallest λmax disagree ({name(paper)} vs {name(classic)})")
    for rule, notes in flags.items():
        warnings.extend(f"the {'paper' if rule == 'highest_ct_mp' else 'λmax'} pick is {n}" for n in notes)
    undetermined = table[table["hesd_type"] == "undetermined"] if "hesd_type" in table else table.iloc[:0]
    if len(undetermined):
        warnings.append(f"{len(undetermined)} checkpoint(s) have an undetermined HESD type and were not candidates "
                        f"of the curvature rules: {undetermined['type_reason'].iloc[0]}")  # fmt: skip
    if grades.get("highest_ct_mp") == "poor":
        warnings.append("the paper's pick is far from the best held-out checkpoint: prefer the held-out pick here")
    return Decision(keep, sentence, grades, flags, warnings)
