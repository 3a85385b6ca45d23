"""Tables, figures and ``evidence.json`` from the zoo's checkpoints (the numbers docs/evidence.md quotes)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from score import MEASURES, finals, granulated, regret_table, tau_table

import hesd
from hesd.interfaces.report import build_report

RULE_NAMES = {
    "highest_ct_mp": "paper: highest Ct among MP",
    "smallest_lambda_max": "smallest λmax",
    "last": "last checkpoint",
}


def _rule_name(rule: str) -> str:
    """The rule's name in hesd (``"trace:min"`` → ``"smallest_trace"``, as :class:`hesd.ExtremeOf` names it)."""
    if ":" not in rule:
        return "last_checkpoint" if rule == "last" else rule
    col, mode = rule.split(":")
    return f"{'smallest' if mode == 'min' else 'largest'}_{col}"


TAU_COLUMNS = {"label": "measure", "family": "family", "τ vs gap [95 % CI]": "τ vs gap [95 % CI]",
               "τ vs held-out acc. [95 % CI]": "τ vs held-out acc. [95 % CI]",
               "Ψ [95 % CI]": "Ψ (granulated) [95 % CI]"}  # fmt: skip
REGRET_COLUMNS = {"rule_name": "rule", "runs": "runs (eval half)", "mean [95 % CI]": "mean regret, points [95 % CI]",
                  "median": "median", "std": "std over runs", "seed_spread": "std over seeds (mean per cell)",
                  "zero_share": "share with zero regret", "declined": "declined"}  # fmt: skip


def _describe(rule: str) -> str:
    if rule in RULE_NAMES:
        return RULE_NAMES[rule]
    col, mode = rule.split(":")
    return f"best measure on the tune half: {MEASURES[col][1]}, {'smallest' if mode == 'min' else 'largest'}"


def _md(df: pd.DataFrame, cols: dict[str, str], digits: int = 2) -> str:
    head = "| " + " | ".join(cols.values()) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            cells.append(
                f"{v:+.{digits}f}"
                if isinstance(v, float) and c.startswith(("tau", "psi", "axis"))
                else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))
            )
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def _ci(r: pd.Series, key: str) -> str:
    return f"{r[key]:+.2f} [{r[key + '_lo']:+.2f}, {r[key + '_hi']:+.2f}]"


def publish(ckpts: pd.DataFrame, out: Path, quick: bool = False) -> dict:
    """Write ``out/tables/*``, ``out/figures/*`` and ``out/evidence.json``; return the headline numbers."""
    tables, figs = out / "tables", out / "figures"
    tables.mkdir(parents=True, exist_ok=True)
    figs.mkdir(parents=True, exist_ok=True)
    last = finals(ckpts)
    tau = tau_table(last)
    psi = granulated(last)
    reg, best = regret_table(ckpts)
    tau.to_csv(tables / "tau.csv", index=False)
    psi.to_csv(tables / "psi.csv", index=False)
    reg.to_csv(tables / "regret.csv", index=False)
    both = tau.merge(psi, on="measure", how="left")
    both["τ vs gap [95 % CI]"] = [_ci(r, "tau_gap") for _, r in both.iterrows()]
    both["τ vs held-out acc. [95 % CI]"] = [_ci(r, "tau_heldout_accuracy") for _, r in both.iterrows()]
    both["Ψ [95 % CI]"] = [f"{r['psi']:+.2f} [{r['psi_lo']:+.2f}, {r['psi_hi']:+.2f}]" for _, r in both.iterrows()]
    (tables / "tau.md").write_text(_md(both, TAU_COLUMNS))
    by_task = tau[["measure", "label", "family"]].copy()
    for task, part in last.groupby("cfg_task"):
        t_task = tau_table(part.reset_index(drop=True))
        by_task[f"τ vs gap, {task} [95 % CI]"] = [_ci(r, "tau_gap") for _, r in t_task.iterrows()]
    by_task.to_csv(tables / "tau_by_task.csv", index=False)
    (tables / "tau_by_task.md").write_text(
        _md(by_task, {"label": "measure", **{c: c for c in by_task.columns if c.startswith("τ")}})
    )
    axes = [c for c in psi.columns if c.startswith("axis_")]
    (tables / "psi_axes.md").write_text(
        _md(
            psi.assign(label=[MEASURES[m][1] for m in psi["measure"]]), {"label": "measure", **{a: a[5:] for a in axes}}
        )
    )
    reg["rule_name"] = [_describe(r) for r in reg["rule"]]
    reg["mean [95 % CI]"] = [f"{r['mean']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]" for _, r in reg.iterrows()]
    (tables / "regret.md").write_text(_md(reg, REGRET_COLUMNS))
    _tau_figure(both, figs / "zoo_tau.png")
    _example_reports(ckpts, out, figs)
    scope = (
        f"{ckpts['cfg_name'].nunique()} GELU MLPs on the digits and a synthetic 4-class task, 10 hyperparameter "
        f"axes, {int(last['cfg_seed'].nunique())} seeds per cell; regret measured on the eval half "
        f"({int(reg['runs'].iloc[0])} runs); hesd {hesd.__version__}"
    )
    evidence = {
        "scope": scope,
        "quick": quick,
        "best_measure": best,
        "rules": {
            _rule_name(r["rule"]): {
                "mean_regret_points": r["mean"],
                "ci": [r["lo"], r["hi"]],
                "median": r["median"],
                "zero_regret_share": r["zero_share"],
                "runs": int(r["runs"]),
            }
            for _, r in reg.iterrows()
        },
    }
    (out / "evidence.json").write_text(json.dumps(evidence, indent=1))
    return {
        "networks": int(ckpts["cfg_name"].nunique()),
        "checkpoints": len(ckpts),
        "best_measure": best,
        "regret": {r["rule"]: round(r["mean"], 2) for _, r in reg.iterrows()},
    }


def _tau_figure(both: pd.DataFrame, path: Path) -> None:
    both = both.sort_values("tau_gap")
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(both) + 1.2))
    y = range(len(both))
    colours = {
        "curvature": "tab:blue",
        "held-out curvature": "tab:cyan",
        "train/held-out difference": "tab:purple",
        "baseline": "tab:gray",
    }
    ax.barh(
        list(y),
        both["tau_gap"],
        color=[colours[f] for f in both["family"]],
        xerr=[both["tau_gap"] - both["tau_gap_lo"], both["tau_gap_hi"] - both["tau_gap"]],
        capsize=2,
    )
    ax.set_yticks(list(y), both["label"], fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("Kendall's τ with the generalisation gap (95 % bootstrap interval)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, list(colours), fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _example_reports(ckpts: pd.DataFrame, out: Path, figs: Path) -> None:
    """hesd's own report for one base run of each task: its figures are the study's examples."""
    with tempfile.TemporaryDirectory() as tmp:
        for task in ("digits", "synthetic"):
            runs = ckpts[(ckpts["cfg_task"] == task) & ckpts["cfg_flipped"].isna()]["cfg_name"].unique()
            if len(runs):
                (Path(tmp) / f"zoo_{task}").symlink_to((out / "results" / runs[0]).resolve(), target_is_directory=True)
        if not any(Path(tmp).iterdir()):
            return
        report = build_report(tmp, Path(tmp) / "report.html", title="hesd zoo examples")
        for png in sorted((report.parent / "figures").glob("*.png")):
            shutil.copy(png, figs / png.name)
