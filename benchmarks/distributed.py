"""Speed-up of data-parallel HVPs with 2 processes over 1, and peak memory of each SLQ basis mode.

    python benchmarks/distributed.py [--quick]

Data parallel: the same data set (ResNet-20, CIFAR shapes, random data) split over 1 or 2
gloo processes of one thread each; the time of one full-data HVP is the median over
repeats, measured on rank 0. SLQ memory: each mode runs in a fresh process and reports its
peak resident memory and the basis bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hesd
from hesd.distributed import shard
from hesd.models import resnet20

CE = torch.nn.functional.cross_entropy


def _data(n: int, bs: int):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(X[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]


def _worker(rank: int, world: int, init: str, n: int, bs: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))  # fmt: skip
    model = resnet20()
    op = hesd.HessianOperator(model, CE, shard(_data(n, bs)), process_group=True, check_deterministic=False)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1))
    op @ v
    times = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        op @ v
        times.append(time.perf_counter() - t)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "seconds": statistics.median(times)}, f)
    dist.destroy_process_group()


def data_parallel(n: int, bs: int, repeats: int) -> dict[int, float]:
    res = {}
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "r.json")
            mp.spawn(_worker, args=(world, os.path.join(d, "init"), n, bs, repeats, out), nprocs=world, join=True)
            with open(out) as f:
                res[world] = json.load(f)["seconds"]
    return res


def _slq_mode(mode: str, steps: int) -> None:
    torch.set_num_threads(2)
    model = resnet20()
    op = hesd.HessianOperator(model, CE, _data(64, 64), check_deterministic=False)
    kw = {"full": {}, "bf16": {"basis_dtype": torch.bfloat16}, "window8": {"reorth": "window", "window": 8},
          "none": {"reorth": "none"}}[mode]  # fmt: skip
    t = time.perf_counter()
    spec = hesd.slq(op, num_steps=steps, num_probes=1, **kw)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    item = 2 if mode == "bf16" else 4
    rows = {"full": steps, "bf16": steps, "window8": 8, "none": 0}[mode]
    print(json.dumps({"mode": mode, "seconds": time.perf_counter() - t, "peak_MB": peak,
                      "basis_MB": rows * op.shape[0] * item / 2**20, "lambda_max": spec.lambda_max,
                      "lambda_min": spec.lambda_min}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--slq-mode", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    if args.slq_mode:
        _slq_mode(args.slq_mode, args.steps)
        return
    n, bs, repeats = (64, 32, 2) if args.quick else (256, 64, 3)
    dp = data_parallel(n, bs, repeats)
    print(f"# data-parallel HVP, ResNet-20, {n} samples in batches of {bs}, gloo, 1 thread per process")
    print(f"1 process : {dp[1]:.3f} s per HVP")
    print(f"2 processes: {dp[2]:.3f} s per HVP  (speed-up {dp[1] / dp[2]:.2f}x)")
    steps = 20 if args.quick else args.steps
    print(f"\n# SLQ basis modes, ResNet-20 (0.27 M parameters), {steps} Lanczos steps, fresh process each")
    print(f"{'mode':<8} {'seconds':>8} {'basis MB':>9} {'peak RSS MB':>12} {'lambda_max':>11} {'lambda_min':>11}")
    for mode in ("full", "bf16", "window8", "none"):
        out = subprocess.run([sys.executable, __file__, "--slq-mode", mode, "--steps", str(steps)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['mode']:<8} {r['seconds']:8.2f} {r['basis_MB']:9.1f} {r['peak_MB']:12.0f} "
              f"{r['lambda_max']:11.5g} {r['lambda_min']:11.5g}")  # fmt: skip


if __name__ == "__main__":
    main()
