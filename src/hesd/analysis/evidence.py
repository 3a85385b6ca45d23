"""How reliable each selection rule was in hesd's model-zoo study, for the report and ``selection.json``.

``evidence.json`` beside this module is written by ``experiments/zoo/run.py`` (the study of
docs/evidence.md): per rule, the mean regret of its picks — held-out accuracy points below the
best checkpoint of the run — with a 95 % bootstrap interval, the median, the share of runs where
it picked the best checkpoint, and the study's scope (models, tasks, axes, runs), so a pick is
shown with how much weight it deserved *there*. Outside that scope it is a hint, not a
guarantee, and the report says so.

Examples:
    >>> from hesd.analysis.evidence import reliability
    >>> r = reliability("smallest_lambda_max")
    >>> sorted(r) if r else []  # doctest: +NORMALIZE_WHITESPACE
    ['ci', 'mean_regret_points', 'median', 'runs', 'scope', 'zero_regret_share']
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["evidence", "reliability", "reliability_text", "study_note"]


@cache
def evidence() -> dict[str, Any]:
    """The study's summary (empty when the package ships none)."""
    try:
        text = resources.files("hesd.analysis").joinpath("evidence.json").read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):  # pragma: no cover - an install without the data file
        return {}
    return json.loads(text)


def reliability(rule: str) -> dict[str, Any] | None:
    """The study's numbers for ``rule`` (a rule name, e.g. ``"highest_ct_mp"``), with its scope; or ``None``."""
    ev = evidence()
    entry = ev.get("rules", {}).get(rule)
    return None if entry is None else {**entry, "scope": ev.get("scope", "")}


def reliability_text(rule: str, with_scope: bool = True) -> str:
    """One sentence on ``rule``'s reliability in the study ("" when it was not measured)."""
    r = reliability(rule)
    if r is None:
        return ""
    lo, hi = r["ci"]
    return (
        f"In hesd's model-zoo study this rule's pick was {r['mean_regret_points']:.1f} held-out accuracy points "
        f"below the run's best checkpoint on average (95 % CI {lo:.1f}–{hi:.1f}; the best in "
        f"{100 * r['zero_regret_share']:.0f} % of {r['runs']} runs)" + (f" — scope: {r['scope']}" if with_scope else "")
    )


def study_note() -> str:
    """What the study found for the rules side by side, in one sentence ("" without a study)."""
    rules = evidence().get("rules", {})
    parts = [(name, rules[key]["mean_regret_points"]) for key, name in
             (("last_checkpoint", "keeping the last checkpoint"), ("highest_ct_mp", "the paper's rule"),
              ("smallest_lambda_max", "smallest λmax")) if key in rules]  # fmt: skip
    if not parts:
        return ""
    said = ", ".join(f"{name} {regret:.1f}" for name, regret in parts)
    return (
        f"In hesd's model-zoo study ({evidence().get('scope', '')}), the mean distance of each rule's pick from the "
        f"run's best checkpoint, in held-out accuracy points, was: {said}. The study and its limits: "
        "docs/evidence.md"
    )
