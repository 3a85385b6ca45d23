"""The top eigenvalue at equal accuracy: hesd's residual stop at several tolerances beside eigenthings' fixed steps.

hesd's ``eigenvalues(k=1, tol=t)`` stops when the residual ``‖Ax − θx‖`` is at most ``t·|θ|``: a
bound on the eigenvalue's error, which for a well-separated top eigenvalue is far larger than the
error itself (about ``‖r‖²/gap``). hessian-eigenthings 1.0's ``lanczos`` runs a fixed number of
steps and certifies nothing. ``benchmarks/scale.py`` compares both at ``tol=1e-3``; this script
asks the question the other way round — how fast is each tool at the accuracy the other reaches —
by running hesd at several tolerances and eigenthings at several step counts on the same GPT-2
(``scale.py``'s configurations: random init, 4 × 128 tokens, the model's own loss), each tool in a
process of its own with glibc's ``malloc`` tuned (``hesd.allocator.environment``), and scoring
every value against ``--reference`` (hesd's float32 reference λmax of that size from
``scale.py``: its top two to 1e-5).

With ``--hesd-steps`` hesd also runs eigenthings' fixed step counts
(``eigenvalues(k=1, max_matvecs=m, start_hint=False, warn=False)``) from the same random starts
(``--seeds``: both tools draw the same start for a seed), the same algorithm with nothing certified,
so the two tools' times compare at equal accuracy step for step.

hesd runs under the memory plan for ``--max-memory`` (the restart basis it sizes), after one
product that builds the kept first-order graph; each stop starts from the same seed.
eigenthings uses its autograd product with eager attention, as in ``scale.py``.

    python benchmarks/top1_tolerance.py --size 40M --reference 57.23544     # minutes on 2 CPU cores
    python benchmarks/top1_tolerance.py --size 40M --reference 57.23544 --tols 1e-3 \
        --steps 10 15 20 25 --hesd-steps 10 15 20 25 --seeds 0 1 2               # 20 minutes
    python benchmarks/top1_tolerance.py --size 1M --reference nan --tols 1e-2 --steps 5   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import DEVICE, SIZES, STEPS, build  # a sibling script


def run_hesd(a) -> list[dict]:
    import hesd
    from hesd.analysis.memory_plan import plan_memory

    model, batch = build(a.size, eager=False)
    plan = plan_memory(model, None, [batch], num_steps=STEPS, max_memory=int(a.max_memory * 2**30))
    op = hesd.HessianOperator(model, None, [batch], **plan.operator_kwargs())
    op @ torch.randn(op.shape[0], device=DEVICE)  # the first-order pass, outside the timings
    rows = []

    def run(setting: str, seed: int, **kwargs) -> None:
        n0, t = op.num_matvecs, time.perf_counter()
        res = hesd.eigenvalues(op, k=1, seed=seed, warn=False, **kwargs)
        rows.append({"tool": "hesd", "setting": setting, "seed": seed, "s": time.perf_counter() - t,
                     "products": op.num_matvecs - n0, "value": float(res.eigenvalues[0]),
                     "bound": float(res.residuals[0]) / abs(float(res.eigenvalues[0]))})  # fmt: skip
        print("ROW " + json.dumps(rows[-1]), flush=True)

    for tol in a.tols:
        run(f"tol {tol:g}", 0, tol=tol, max_basis=plan.eigen_basis)
    for seed in a.seeds:  # a fixed step count from a random start, as eigenthings runs: no certificate
        for steps in a.hesd_steps:
            run(f"{steps} steps", seed, max_matvecs=steps, start_hint=False, max_basis=max(plan.eigen_basis, steps + 1))
    return rows


def run_eigenthings(a) -> list[dict]:
    import hessian_eigenthings as he

    model, batch = build(a.size, eager=True)
    op = he.HessianOperator(model, [batch], he.hf_lm_loss())
    op.matvec(torch.randn(op.size, device=DEVICE))  # warm-up, outside the timings
    rows = []
    for seed in a.seeds:
        for steps in a.steps:
            t = time.perf_counter()
            res = he.lanczos(op, k=1, max_iter=steps, which="LA", tol=1e-3, seed=seed)
            rows.append({"tool": "eigenthings", "setting": f"{steps} steps", "seed": seed,
                         "s": time.perf_counter() - t, "products": steps, "value": float(res.eigenvalues[0]),
                         "bound": math.nan})  # fmt: skip
            print("ROW " + json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="40M", choices=list(SIZES))
    ap.add_argument("--reference", type=float, required=True, help="λmax to score against ('nan': none)")
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-2, 3e-2, 1e-1])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20])
    ap.add_argument("--hesd-steps", type=int, nargs="*", default=[], help="also run hesd for these fixed step "
                    "counts from a random start, as eigenthings runs")  # fmt: skip
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="start seeds of the fixed-step runs")
    ap.add_argument("--max-memory", type=float, default=10.0, help="GiB for hesd's plan")
    ap.add_argument("--tools", nargs="+", default=["hesd", "eigenthings"], choices=["hesd", "eigenthings"])
    ap.add_argument("--child", choices=["hesd", "eigenthings"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        {"hesd": run_hesd, "eigenthings": run_eigenthings}[a.child](a)
        return
    from hesd.allocator import environment

    env = os.environ | environment()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPT-2 {a.size}, reference λmax "
          f"{a.reference:.7g}; hesd under a {a.max_memory:g} GiB plan; glibc malloc tuned for both")  # fmt: skip
    print(f"{'tool':<12} {'setting':<10} {'seed':>4} {'products':>8} {'s':>8} {'λ':>11} {'error':>9} "
          f"{'hesd bound':>10}")  # fmt: skip
    for tool in a.tools:
        cmd = [sys.executable, __file__, "--child", tool, "--size", a.size, "--reference", str(a.reference),
               "--max-memory", str(a.max_memory), "--tols", *map(str, a.tols),
               "--steps", *map(str, a.steps), "--hesd-steps", *map(str, a.hesd_steps),
               "--seeds", *map(str, a.seeds)]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        rows = [json.loads(x[4:]) for x in done.stdout.splitlines() if x.startswith("ROW ")]
        if done.returncode != 0:
            print(f"{tool:<12} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        for r in rows:
            err = abs(r["value"] - a.reference) / abs(a.reference)
            print(f"{r['tool']:<12} {r['setting']:<10} {r.get('seed', 0):>4} {r['products']:>8} {r['s']:8.1f} "
                  f"{r['value']:11.7g} {err:9.1e} {r['bound']:10.1e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
