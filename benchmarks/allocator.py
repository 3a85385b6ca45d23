"""Each product's time inside ``hesd.eigenvalues``, with glibc's malloc as it is or tuned.

Runs top-5 (``tol=1e-3``) twice in one process on ResNet-20 (``--trained``: the model cached by
``compare.py --trained``) and prints every product's seconds, then the process's user and system
CPU time. ``--tune`` calls :func:`hesd.tune_cpu_allocator` first (what the ``hesd`` command line
does); the environment variables of :func:`hesd.allocator.environment` give the same settings
from outside (BENCHMARKS.md §4).

    python benchmarks/allocator.py --trained             # glibc defaults
    python benchmarks/allocator.py --trained --tune      # tuned in the process
    python benchmarks/allocator.py --quick               # smoke
"""

from __future__ import annotations

import argparse
import resource
import time

import compare
import torch

import hesd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tune", action="store_true", help="call hesd.tune_cpu_allocator() first")
    ap.add_argument("--trained", action="store_true", help="the trained ResNet-20 of compare.py --trained")
    ap.add_argument("--quick", action="store_true", help="smoke: the digits MLP")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.tune:
        print("tune_cpu_allocator:", hesd.tune_cpu_allocator())
    torch.set_num_threads(args.threads)
    compare.TRAINED = args.trained
    model, X, y = compare.make("mlp" if args.quick else "resnet20")
    op = hesd.HessianOperator(model, compare.CE, (X, y))
    op @ torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0))  # warm-up, as in compare.py
    orig, times = op._matmat, []

    def timed(V):
        t = time.perf_counter()
        out = orig(V)
        times.append(time.perf_counter() - t)
        return out

    op._matmat = timed
    for run in (1, 2):
        times.clear()
        t = time.perf_counter()
        r = hesd.eigenvalues(op, k=5, which="LA", tol=1e-3, seed=0)
        total = time.perf_counter() - t
        print(f"run {run}: {total:.3f} s, {r.num_matvecs} products, {sum(times):.3f} s in them:",
              " ".join(f"{x:.3f}" for x in times))  # fmt: skip
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(f"process CPU time: user {use.ru_utime:.2f} s, system {use.ru_stime:.2f} s")


if __name__ == "__main__":
    main()
