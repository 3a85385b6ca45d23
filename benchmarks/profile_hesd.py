"""Where hesd's time goes: cProfile of one task on ResNet-20 or the digits MLP, any device.

    python benchmarks/profile_hesd.py --task trace --device cuda
    python benchmarks/profile_hesd.py --task slq8 --model mlp

Tasks: ``trace`` (Hutch++, 60 products in blocks of 8), ``slq8`` (8 probes × 50 steps in
lockstep), ``slq1`` (1 probe × 100 steps), ``top5`` (restarted Lanczos). The task runs
twice on one operator: the first (cold) run includes one-off costs (lazy imports, CUDA
kernel selection, ``auto``'s choice of block method); the second is profiled. Prints both
wall times, the products, the block method and the functions with the most own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from compare import CE, make

import hesd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="trace", choices=("trace", "slq8", "slq1", "top5"))
    ap.add_argument("--model", default="resnet20", choices=("resnet20", "mlp"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=22)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import compare

    compare.DEVICE = torch.device(args.device)
    model, X, y = make(args.model)
    op = hesd.HessianOperator(model, CE, (X, y))
    op.prepare()
    run = {
        "trace": lambda: hesd.trace(op, "hutchpp", num_matvecs=60, seed=0),
        "slq8": lambda: hesd.slq(op, 50, 8, seed=0, lockstep=8),
        "slq1": lambda: hesd.slq(op, 100, 1, seed=0),
        "top5": lambda: hesd.eigenvalues(op, k=5, tol=1e-3),
    }[args.task]
    sync = torch.cuda.synchronize if compare.DEVICE.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    run()
    sync()
    cold = time.perf_counter() - t
    before = op.num_matvecs
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    run()
    sync()
    prof.disable()
    warm = time.perf_counter() - t
    print(
        f"# {args.task} on {args.model}, {compare.DEVICE}: cold {cold:.3f} s, warm {warm:.3f} s for "
        f"{op.num_matvecs - before} products; block method {op.block_method} {op.block_timings or ''}"
    )
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
