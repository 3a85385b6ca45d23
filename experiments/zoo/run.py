"""The model zoo study: train every network, measure every checkpoint, score every measure.

python experiments/zoo/run.py [--quick] [--out experiments/zoo/runs] [--bases 8] [--seeds 2] [--workers 2]

Unattended and resumable: a finished network is not retrained, a finished checkpoint not
re-analysed (hesd's own results store, one folder per run), so killing it and starting it again
loses at most the checkpoints in flight. ``--quick`` (CI, minutes) trains 3 epochs of one base
per task. Writes ``OUT/checkpoints.csv`` (every checkpoint, every measure), ``OUT/tables/``
(τ, Ψ, regret, as CSV and Markdown) and ``OUT/evidence.json`` (each rule's measured
reliability, the file hesd's report reads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from publish import publish
from space import design, quick

ROOT = Path(__file__).resolve().parent


def _one(args: tuple) -> pd.DataFrame | str:
    run, out, steps, probes = args
    import torch

    torch.set_num_threads(1)
    from measure import measure
    from train import train

    try:
        train(run, out / "checkpoints" / run.name)
        return measure(run, out / "checkpoints" / run.name, out / "results" / run.name, steps, probes)
    except Exception as exc:  # one network's failure is reported, the zoo goes on
        return f"{run.name}: {type(exc).__name__}: {exc}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI: one base per task, 3 epochs, short SLQ")
    ap.add_argument("--out", type=Path, default=ROOT / "runs")
    ap.add_argument("--bases", type=int, default=8, help="base configurations per task")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per cell")
    ap.add_argument("--workers", type=int, default=2, help="processes (one core each)")
    ap.add_argument("--publish-only", action="store_true", help="rebuild tables and figures from OUT/checkpoints.csv")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.publish_only:
        print(json.dumps(publish(pd.read_csv(args.out / "checkpoints.csv"), args.out, quick=args.quick), indent=1))
        return
    runs = design(2 if args.quick else args.bases, 1 if args.quick else args.seeds)
    if args.quick:
        runs = [quick(r) for r in runs]
    steps, probes = (10, 1) if args.quick else (30, 2)
    print(f"zoo: {len(runs)} networks ({len({r.cell for r in runs})} cells), SLQ {steps} steps × {probes} probes")
    tables, failed = [], []
    with get_context("spawn").Pool(args.workers) as pool:
        for i, res in enumerate(pool.imap_unordered(_one, [(r, args.out, steps, probes) for r in runs])):
            (failed if isinstance(res, str) else tables).append(res)
            if (i + 1) % 20 == 0 or i + 1 == len(runs):
                print(f"  {i + 1}/{len(runs)} networks, {time.perf_counter() - t0:.0f} s", flush=True)
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    ckpts = pd.concat(tables, ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpts.drop(columns=[c for c in ckpts.columns if c in ("spectrum", "heldout_spectrum")], errors="ignore").to_csv(
        args.out / "checkpoints.csv", index=False
    )
    summary = publish(ckpts, args.out, quick=args.quick)
    print(json.dumps(summary, indent=1))
    print(f"zoo: done in {time.perf_counter() - t0:.0f} s; {len(failed)} network(s) failed")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
