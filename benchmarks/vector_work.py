"""The Lanczos loops' own cost beside a free operator: the compiled step against the PyTorch path.

A diagonal float32 operator of ``--size`` entries (GPT-2 small's 123 751 680 by default; the
eigenvalues 30, 20, 15, 12 and 11 above uniform ones in [-0.5, 1.5)) costs one elementwise
product, so what a loop spends beyond it is its vector work: inner products, Gram-Schmidt,
norms, writing the basis, restarts. Each task runs a fixed number of products (``tol=1e-12``
with ``max_matvecs``; random start):

* ``slq`` — 30 SLQ steps over a window of 3 vectors (the 124 M plan's SLQ);
* ``top1-window`` — ``eigenvalues(k=1, reorth="window")``, 30 products (the plan's top-1);
* ``top1-restart6`` — ``eigenvalues(k=1, max_basis=6)``, restarted, 30 products;
* ``top5-restart12`` — ``eigenvalues(k=5, max_basis=12)``, restarted, 40 products.

Every (path, round) runs in a fresh process, the two paths alternating (``HESD_FUSED=1``: the
compiled step of :mod:`hesd.algorithms.fused`, where Numba is installed; ``HESD_FUSED=0``: the
PyTorch path), with glibc tuned as the command line tunes it. Prints each run's wall time, the
time in the operator, the rest, the kernel time and page faults, the eigenvalues found, then the
median rest of each path and their ratio.

    python benchmarks/vector_work.py                          # 124 M, all tasks, 2 rounds (minutes)
    python benchmarks/vector_work.py --size 2000000 --rounds 1 --tasks top1-restart6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import hesd
from hesd.allocator import tune_cpu_allocator

TASKS = ("slq", "top1-window", "top1-restart6", "top5-restart12")


class Diagonal(hesd.operators.LinearOperator):
    """``diag(d)``, counting the seconds spent in products."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.d = torch.rand(n, generator=g) * 2 - 0.5
        self.d[:5] = torch.tensor([30.0, 20.0, 15.0, 12.0, 11.0])
        self.shape, self.dtype, self.device = (n, n), torch.float32, torch.device("cpu")
        self.seconds = 0.0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        out = self.d[:, None] * V
        self.seconds += time.perf_counter() - t
        return out


def run(task: str, op: Diagonal) -> list[float]:
    """The task's eigenvalues (the SLQ: its largest Ritz value)."""
    if task == "slq":
        return [float(hesd.slq(op, 30, 1, seed=0, reorth="window", window=3).lambda_max)]
    kw = {
        "top1-window": dict(k=1, reorth="window", max_matvecs=30),
        "top1-restart6": dict(k=1, max_basis=6, max_matvecs=30),
        "top5-restart12": dict(k=5, max_basis=12, max_matvecs=40),
    }[task]
    return hesd.eigenvalues(op, tol=1e-12, warn=False, start_hint=False, **kw).eigenvalues.tolist()


def child(n: int, tasks: list[str]) -> None:
    tune_cpu_allocator(reuse_large=True)
    op = Diagonal(n)
    for task in tasks:
        op.seconds = 0.0
        r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        values = run(task, op)
        wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
        print("RESULT " + json.dumps({"task": task, "wall": wall, "products": op.seconds, "values": values,
                                      "system": r1.ru_stime - r0.ru_stime,
                                      "faults": r1.ru_minflt - r0.ru_minflt}), flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=123_751_680, help="entries of the operator's vectors")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        child(a.size, a.tasks)
        return
    from hesd.algorithms import fused

    paths = ("1", "0") if fused.AVAILABLE else ("0",)
    print(f"torch {torch.__version__}, {a.threads} threads; a free diagonal operator of {a.size:,} float32 entries; "
          f"compiled step {'available' if fused.AVAILABLE else 'not available (no Numba): the PyTorch path only'}",
          flush=True)  # fmt: skip
    rest: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.rounds):
        for path in paths:
            cmd = [sys.executable, __file__, "--child", "--size", str(a.size), "--threads", str(a.threads),
                   "--tasks", *a.tasks]  # fmt: skip
            out = subprocess.run(cmd, env=os.environ | {"HESD_FUSED": path}, capture_output=True, text=True, check=True)
            for line in out.stdout.splitlines():
                if not line.startswith("RESULT "):
                    continue
                r = json.loads(line[7:])
                rest.setdefault((r["task"], path), []).append(r["wall"] - r["products"])
                values = " ".join(f"{v:.6f}" for v in r["values"])
                print(f"HESD_FUSED={path} {r['task']:15s} wall {r['wall']:7.2f} s  products {r['products']:6.2f}  "
                      f"rest {r['wall'] - r['products']:7.2f}  system {r['system']:5.1f} s  "
                      f"faults {r['faults'] / 1e6:.2f} M  λ {values}", flush=True)  # fmt: skip
    for task in a.tasks:
        medians = {p: statistics.median(rest[(task, p)]) for p in paths}
        line = f"{task:15s} rest (median): " + ", ".join(
            f"{'compiled' if p == '1' else 'PyTorch path'} {s:.2f} s" for p, s in medians.items()
        )
        if len(medians) == 2:
            line += f"; the PyTorch path's / the compiled step's {medians['0'] / medians['1']:.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
