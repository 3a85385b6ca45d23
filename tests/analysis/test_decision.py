"""The report's decision: what to keep, graded against held-out data, with plain warnings."""

from __future__ import annotations

import pandas as pd

from hesd.analysis.decision import decide, grade


def _table(types=("MP", "MP", "MP"), qs=(False, False, False)):
    names = ["a.pt", "b.pt", "c.pt"]
    return pd.DataFrame({"checkpoint": [f"/r/{n}" for n in names], "name": names, "epoch": [1, 2, 3],
                         "status": ["ok"] * 3, "hesd_type": list(types), "qs_flag": list(qs)})  # fmt: skip


def _pick(ckpt, gap=None, metric="heldout_accuracy", value=0.9):
    e = {"checkpoint": ckpt, "epoch": {"a": 1, "b": 2, "c": 3}[ckpt[-4]] if ckpt else None, "reason": "r"}
    if gap is not None:
        e.update(gap_to_best=gap, gap_metric=metric, **{metric: value})
    return e


def test_grades_by_distance_from_the_best():
    assert grade(_pick("/r/a.pt", 0.005)) == "good" and grade(_pick("/r/a.pt", 0.03)) == "fair"
    assert grade(_pick("/r/a.pt", 0.53)) == "poor" and grade(_pick("/r/a.pt")) == "unknown"
    assert grade(_pick("/r/a.pt", 0.02, "heldout_loss", 2.02)) == "good"  # 1 % of the best loss 2.0
    assert grade(_pick("/r/a.pt", 0.3, "heldout_loss", 2.3)) == "poor"


def test_a_poor_quasi_singular_pick_is_not_presented_as_good():
    sel = {"highest_ct_mp": _pick("/r/c.pt", 0.53), "smallest_lambda_max": _pick("/r/b.pt", 0.0),
           "best_heldout": _pick("/r/b.pt", 0.0)}  # fmt: skip
    d = decide(_table(qs=(False, False, True)), sel)
    assert d.keep == "c.pt" and d.grades["highest_ct_mp"] == "poor"
    assert "53.00 points below the best" in d.sentence and "best held-out checkpoint is b.pt" in d.sentence
    assert any("quasi-singular" in w for w in d.warnings) and any("disagree" in w for w in d.warnings)
    assert any("prefer the held-out pick" in w for w in d.warnings)


def test_no_held_out_data_and_all_mn_are_said_plainly():
    sel = {"highest_ct_mp": {"checkpoint": None, "epoch": None, "reason": "no MP"},
           "smallest_lambda_max": _pick("/r/a.pt"), "best_heldout": {"checkpoint": None, "reason": "none"}}  # fmt: skip
    d = decide(_table(types=("MN", "MN", "MN")), sel)
    assert d.keep is None and "does not apply" in d.sentence
    assert any("no held-out data" in w for w in d.warnings) and any("every checkpoint is MN" in w for w in d.warnings)
