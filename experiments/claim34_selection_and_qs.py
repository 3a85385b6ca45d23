"""Claims 3 and 4: checkpoint selection by highest Ct (among MP) vs smallest lambda_max, and QS-HESD.

Long training with 20 % label noise on the digits (so it overfits), over >= 5 seeds, MLP and
CNN. Claim 3: held-out accuracy and epoch of the Ct pick, the lambda_max pick and the best
checkpoint. Claim 4: does lambda_max keep falling late in training without held-out gains,
and does hesd's QS rule flag those checkpoints while Ct stays stable?
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from common import Config, elapsed, run_configs, save_table

import hesd


def configs(quick: bool, seeds: int) -> list[Config]:
    if quick:
        return [Config(model="mlp", label_noise=0.2, epochs=4, save_every=1, seed=0)]
    out = []
    for s in range(seeds):
        out.append(Config(model="mlp", label_noise=0.2, lr=0.05, epochs=60, save_every=3, seed=s))
        out.append(Config(model="cnn", label_noise=0.2, lr=0.05, epochs=30, save_every=2, seed=s))
    return out


def picks(t: pd.DataFrame) -> dict:
    sel = {r.name: r.select(t) for r in (hesd.HighestCtAmongMP(), hesd.SmallestLambdaMax(), hesd.BestHeldout())}
    out = {}
    for name, s in sel.items():
        row = t[t["checkpoint"] == s.checkpoint]
        out[f"{name}_epoch"] = s.epoch
        out[f"{name}_acc"] = float(row["heldout_accuracy"].iloc[0]) if len(row) else np.nan
    return out


def qs_summary(t: pd.DataFrame) -> dict:
    ok = t[(t["status"] == "ok") & (t["epoch"] > 0)].sort_values("epoch")
    late = ok[ok["epoch"] >= ok["epoch"].max() / 2]
    first, last = late.iloc[0], late.iloc[-1]
    return {
        "lmax_peak": ok["lambda_max"].max(),
        "lmax_late_first": first["lambda_max"], "lmax_late_last": last["lambda_max"],
        "acc_late_first": first["heldout_accuracy"], "acc_late_last": last["heldout_accuracy"],
        "ct_late_std": late["ct"].std(), "qs_flags": int(ok["qs_flag"].sum()), "checkpoints": len(ok),
    }  # fmt: skip


def main() -> None:
    args, cfgs, tables, t0 = run_configs(__doc__, configs, default_seeds=5)
    rows, qs_rows = [], []
    for c, t in zip(cfgs, tables, strict=True):
        rows.append({"model": c.model, "seed": c.seed, **picks(t)})
        qs_rows.append({"model": c.model, "seed": c.seed, **qs_summary(t)})
    sel = pd.DataFrame(rows)
    qs = pd.DataFrame(qs_rows)
    save_table(sel, args.out / "tables", "claim3_selection")
    save_table(qs, args.out / "tables", "claim4_qs")
    save_table(pd.concat(tables, ignore_index=True), args.out / "tables", "claim34_checkpoints")
    print(sel.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for m, g in sel.groupby("model"):
        d = g["highest_ct_mp_acc"] - g["smallest_lambda_max_acc"]
        print(f"{m}: Ct pick - lambda_max pick = {d.mean() * 100:+.2f} ± {d.std() * 100:.2f} points "
              f"(Ct better in {int((d > 0).sum())}, worse in {int((d < 0).sum())} of {len(d)} seeds); "
              f"epochs {g['highest_ct_mp_epoch'].mean():.1f} vs "
              f"{g['smallest_lambda_max_epoch'].mean():.1f}")  # fmt: skip
    print("\n" + qs.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\n{elapsed(t0)}")


if __name__ == "__main__":
    main()
