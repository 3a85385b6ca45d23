"""BatchNorm in eval mode: PyTorch's kernel against hesd's affine form (``eval_batchnorm``), in products.

Two measurements, both printed with min and median:

* **one layer**: a Hessian-vector product through ``relu(batch_norm(x)) · R`` with respect to
  the layer's input and parameters, at ResNet-20's three activation shapes (batch 128), the
  two forms interleaved in one process. This isolates BatchNorm's double backward.
* **ResNet-20**: ``op @ v`` of a ``HessianOperator`` (one batch of 128) per ``hvp_method``,
  each form in its own process and the processes alternated (native, affine, native, ...):
  in one process, alternating two operators' products made the allocator return and
  re-fault memory and hid the difference (``BENCHMARKS.md`` §4).

    python benchmarks/batchnorm.py                # full (about 3 minutes on 2 CPU threads)
    python benchmarks/batchnorm.py --quick        # smoke
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import hesd
from hesd.models import resnet20
from hesd.operators.batchnorm import AffineEvalBatchNorm

SHAPES = ((16, 32), (32, 16), (64, 8))  # (channels, height = width) of ResNet-20's three stages


def _stats(ts: list[float]) -> str:
    return f"min {min(ts) * 1e3:8.2f} ms  median {statistics.median(ts) * 1e3:8.2f} ms"


def one_layer(batch: int, rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    print(f"## one layer: HVP through relu(batch_norm(x)) · R, batch {batch}, {rounds} interleaved rounds")
    for c, hw in SHAPES:
        shape = (batch, c, hw, hw)
        x = torch.randn(*shape, generator=g).requires_grad_()
        w, b = torch.randn(c, generator=g).requires_grad_(), torch.randn(c, generator=g).requires_grad_()
        mean, var = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
        R = torch.randn(*shape, generator=g)
        vs = (torch.randn(*shape, generator=g), torch.randn(c, generator=g), torch.randn(c, generator=g))
        graphs = {}
        for form in ("native", "affine"):
            with AffineEvalBatchNorm() if form == "affine" else torch.enable_grad():
                y = F.batch_norm(x, mean, var, w, b, training=False)
            graphs[form] = torch.autograd.grad((torch.relu(y) * R).sum(), (x, w, b), create_graph=True)
        times: dict[str, list[float]] = {"native": [], "affine": []}
        for r in range(rounds + 1):
            for form in ("native", "affine") if r % 2 else ("affine", "native"):
                t = time.perf_counter()
                torch.autograd.grad(graphs[form], (x, w, b), grad_outputs=vs, retain_graph=True)
                if r:  # round 0 warms up
                    times[form].append(time.perf_counter() - t)
        ratio = statistics.median(times["native"]) / statistics.median(times["affine"])
        print(f"{shape!s:<20} native {_stats(times['native'])} | affine {_stats(times['affine'])} "
              f"| native / affine (medians) {ratio:.2f}")  # fmt: skip


def worker(method: str, form: str, batch: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    torch.manual_seed(0)
    op = hesd.HessianOperator(resnet20(), nn.functional.cross_entropy, (X, y), hvp_method=method,
                              eval_batchnorm=form)  # fmt: skip
    op.prepare()
    v = torch.randn(op.shape[0], generator=g)
    for _ in range(2):
        op @ v
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        op @ v
        ts.append(time.perf_counter() - t)
    print(statistics.median(ts), min(ts))


def model_level(batch: int, repeats: int, processes: int, threads: int) -> None:
    print(f"\n## ResNet-20, batch {batch}: op @ v, median of {repeats} products per process, "
          f"{processes} processes per form, alternated")  # fmt: skip
    for method in ("graph", "double_backward"):
        med: dict[str, list[float]] = {"native": [], "affine": []}
        for _ in range(processes):
            for form in ("native", "affine"):
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", method, form, "--batch", str(batch),
                     "--repeats", str(repeats), "--threads", str(threads)],
                    capture_output=True, text=True, check=True,
                ).stdout.split()  # fmt: skip
                med[form].append(float(out[0]))
        line = " | ".join(f"{f} " + " ".join(f"{t:.3f}" for t in med[f]) + " s" for f in med)
        ratio = statistics.median(med["native"]) / statistics.median(med["affine"])
        print(f"{method:<16} {line} | native / affine (median of medians) {ratio:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "FORM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(*args.worker, args.batch, args.repeats)
        return
    batch, rounds, repeats, processes = (16, 2, 2, 1) if args.quick else (args.batch, 20, args.repeats, 3)
    print(f"# hesd {hesd.__version__}, torch {torch.__version__}, {args.threads} threads")
    one_layer(batch, rounds)
    model_level(batch, repeats, processes, args.threads)


if __name__ == "__main__":
    main()
