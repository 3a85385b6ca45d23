"""Score every candidate measure: Kendall's τ, granulated τ (Ψ), bootstrap intervals, and selection regret.

* **τ** (Kendall's τ-b, ``scipy.stats.kendalltau``) of each measure at each run's last
  checkpoint against the generalisation gap (training accuracy on the labels trained on minus
  held-out accuracy) and against held-out accuracy, over all runs; 95 % intervals from 1,000
  bootstrap resamples of the runs.
* **Granulated τ** (Jiang et al.'s Ψ): per axis, over the pairs of runs that differ in that axis
  only (same task, base and seed), the mean of sign(Δmeasure)·sign(Δgap) — Kendall's τ of a pair —
  and Ψ, their mean over the axes; intervals from bootstrapping the pairs.
* **Regret** of a selection rule along training: the best held-out accuracy among a run's
  trained checkpoints minus that of the rule's pick, in points. Rules: the paper's (highest Ct
  among MP checkpoints, hesd's own rule; where it declines, the last checkpoint is kept), the
  smallest λmax (hesd's), the last checkpoint, and the best single measure, whose column and
  direction are chosen on the "tune" half of the bases and scored on the "eval" half only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from hesd.analysis.selection import HighestCtAmongMP, SmallestLambdaMax

#: candidate measures: column → (family, what it is)
MEASURES: dict[str, tuple[str, str]] = {
    "lambda_max": ("curvature", "λmax"),
    "trace": ("curvature", "trace (SLQ)"),
    "ct": ("curvature", "Ct"),
    "re": ("curvature", "re"),
    "kh05": ("curvature", "KH05"),
    "lambda_min": ("curvature", "λmin"),
    "width": ("curvature", "spectral width λmax − λmin"),
    "neg_mass": ("curvature", "negative spectral mass"),
    "eos_ratio": ("curvature", "η·λmax/2"),
    "heldout_lambda_max": ("held-out curvature", "λmax on held-out data"),
    "heldout_ct": ("held-out curvature", "Ct on held-out data"),
    "heldout_re": ("held-out curvature", "re on held-out data"),
    "heldout_kh05": ("held-out curvature", "KH05 on held-out data"),
    "diff_lambda_max": ("train/held-out difference", "Δλmax (held-out − train)"),
    "diff_ct": ("train/held-out difference", "ΔCt"),
    "diff_re": ("train/held-out difference", "Δre"),
    "diff_kh05": ("train/held-out difference", "ΔKH05"),
    "param_norm": ("baseline", "parameter norm"),
    "dist_init": ("baseline", "distance from initialisation"),
    "sharpness_random": ("baseline", "random-direction sharpness"),
}
B = 1000


def finals(ckpts: pd.DataFrame) -> pd.DataFrame:
    """Each run's last analysed checkpoint, with its generalisation gap."""
    ok = ckpts[(ckpts["status"] == "ok") & (ckpts["epoch"] > 0)]
    last = ok.loc[ok.groupby("cfg_name")["epoch"].idxmax()].copy()
    last["gap"] = last["train_accuracy"] - last["heldout_accuracy"]
    return last.reset_index(drop=True)


def _tau(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    return float(kendalltau(a[ok], b[ok]).statistic)


def tau_table(last: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """τ of every measure against the gap and against held-out accuracy, with bootstrap intervals."""
    rng = np.random.default_rng(seed)
    idx = [rng.integers(0, len(last), len(last)) for _ in range(B)]
    rows = []
    for col, (family, label) in MEASURES.items():
        if col not in last:
            continue
        m = last[col].to_numpy(dtype=float)
        row = {"measure": col, "label": label, "family": family, "runs": int(np.isfinite(m).sum())}
        for target in ("gap", "heldout_accuracy"):
            t = last[target].to_numpy(dtype=float)
            boot = np.array([_tau(m[i], t[i]) for i in idx])
            lo, hi = np.nanpercentile(boot, [2.5, 97.5])
            row |= {f"tau_{target}": _tau(m, t), f"tau_{target}_lo": lo, f"tau_{target}_hi": hi}
        rows.append(row)
    return pd.DataFrame(rows)


def granulated(last: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per measure: τ over the one-axis pairs of each axis, and Ψ (their mean), with bootstrap intervals."""
    base = last[last["cfg_flipped"].isna()].set_index(["cfg_task", "cfg_base", "cfg_seed"])
    flips = last[last["cfg_flipped"].notna()]
    rng = np.random.default_rng(seed)
    rows = []
    for col in MEASURES:
        if col not in last:
            continue
        signs: dict[str, list[float]] = {}
        for _, r in flips.iterrows():
            key = (r["cfg_task"], r["cfg_base"], r["cfg_seed"])
            if key not in base.index:
                continue
            b = base.loc[key]
            dm, dg = r[col] - b[col], r["gap"] - b["gap"]
            if np.isfinite(dm) and np.isfinite(dg):
                signs.setdefault(r["cfg_flipped"], []).append(float(np.sign(dm) * np.sign(dg)))
        if not signs:
            continue
        per_axis = {a: float(np.mean(v)) for a, v in signs.items()}
        boot = [np.mean([np.mean(rng.choice(v, len(v))) for v in signs.values()]) for _ in range(B)]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        rows.append(
            {
                "measure": col,
                "psi": float(np.mean(list(per_axis.values()))),
                "psi_lo": lo,
                "psi_hi": hi,
                "pairs": sum(len(v) for v in signs.values()),
            }
            | {f"axis_{a}": v for a, v in per_axis.items()}
        )
    return pd.DataFrame(rows)


def _pick(run: pd.DataFrame, rule: str) -> pd.Series:
    if rule == "last":
        return run.loc[run["epoch"].idxmax()]
    if rule in ("highest_ct_mp", "smallest_lambda_max"):
        r = HighestCtAmongMP() if rule == "highest_ct_mp" else SmallestLambdaMax()
        sel = r.select(run)
        if sel.checkpoint is None:  # declined (no MP checkpoint): a user keeps the last one
            return run.loc[run["epoch"].idxmax()]
        return run[run["checkpoint"] == sel.checkpoint].iloc[0]
    col, mode = rule.split(":")
    vals = run[col].astype(float)
    return run.loc[vals.idxmin() if mode == "min" else vals.idxmax()]


def regrets(ckpts: pd.DataFrame, rule: str) -> pd.DataFrame:
    """Per run: the rule's regret in held-out accuracy points, and whether hesd's rule declined."""
    ok = ckpts[(ckpts["status"] == "ok") & (ckpts["epoch"] > 0)]
    out = []
    for name, run in ok.groupby("cfg_name"):
        run = run.reset_index(drop=True)
        pick = _pick(run, rule)
        declined = rule == "highest_ct_mp" and HighestCtAmongMP().select(run).checkpoint is None
        out.append(
            {
                "run": name,
                "half": run["cfg_half"].iloc[0],
                "cell": run["cfg_cell"].iloc[0],
                "regret": 100 * (run["heldout_accuracy"].max() - pick["heldout_accuracy"]),
                "declined": declined,
            }
        )
    return pd.DataFrame(out)


def best_measure_rule(ckpts: pd.DataFrame) -> tuple[str, float]:
    """The measure and direction with the smallest mean regret on the tune half: ``("col:min", regret)``."""
    tune = ckpts[ckpts["cfg_half"] == "tune"]
    scores = {
        f"{c}:{m}": regrets(tune, f"{c}:{m}")["regret"].mean()
        for c in MEASURES
        if c in tune
        for m in ("min", "max")
        if tune[c].notna().any()
    }
    best = min(scores, key=lambda k: scores[k])
    return best, float(scores[best])


def regret_table(ckpts: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """Each rule's regret on the eval half: mean with a bootstrap interval, median, spread, zero-regret share."""
    best, _ = best_measure_rule(ckpts)
    rng = np.random.default_rng(seed)
    rows = []
    for rule in ["highest_ct_mp", "smallest_lambda_max", "last"] + ([best] if best != "lambda_max:min" else []):
        r = regrets(ckpts, rule)
        ev = r[r["half"] == "eval"]["regret"].to_numpy()
        cells = r[r["half"] == "eval"].groupby("cell")["regret"]
        boot = [rng.choice(ev, len(ev)).mean() for _ in range(B)]
        rows.append(
            {
                "rule": rule,
                "runs": len(ev),
                "mean": ev.mean(),
                "lo": np.percentile(boot, 2.5),
                "hi": np.percentile(boot, 97.5),
                "median": float(np.median(ev)),
                "std": ev.std(ddof=1),
                "seed_spread": float(cells.std(ddof=1).mean()),
                "zero_share": float((ev == 0).mean()),
                "declined": int(r[r["half"] == "eval"]["declined"].sum()),
            }
        )
    return pd.DataFrame(rows), best
