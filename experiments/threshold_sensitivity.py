"""Sensitivity of the MP/MN verdict to the Ct threshold (-0.8 ... -0.4), over every checkpoint analysed.

Reads the per-checkpoint tables the claim scripts wrote (run them first, or use run_all.py).
"""

from __future__ import annotations

import pandas as pd
from common import parser, save_table

THRESHOLDS = [-0.8, -0.7, -0.6, -0.5, -0.4]


def main() -> None:
    args = parser(__doc__).parse_args()
    tables = [pd.read_csv(p) for p in sorted((args.out / "tables").glob("claim*_checkpoints.csv"))]
    if not tables:
        raise SystemExit(f"no checkpoint tables under {args.out / 'tables'}; run the claim scripts first")
    t = pd.concat(tables, ignore_index=True).drop_duplicates(subset=["checkpoint"])
    t = t[(t["status"] == "ok") & (t["epoch"] > 0)]
    base = t["ct"] > -0.6
    rows = []
    for thr in THRESHOLDS:
        mp = t["ct"] > thr
        rows.append({"threshold": thr, "checkpoints": len(t), "MP": int(mp.sum()), "MN": int((~mp).sum()),
                     "verdicts_changed_vs_-0.6": int((mp != base).sum())})  # fmt: skip
    out = pd.DataFrame(rows)
    save_table(out, args.out / "tables", "threshold_sensitivity")
    print(out.to_string(index=False))


if __name__ == "__main__":
    main()
