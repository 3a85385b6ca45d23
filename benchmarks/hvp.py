"""Time one gradient and one Hessian-vector product by each method, measured in one run.

Models: the digits MLP (all 1348 training images, one batch) and a CIFAR-shaped ResNet-20
(random data, BatchNorm in eval mode, batches of 128). For each: a single batch and a data
set of several batches. Prints seconds per product and the ratio to one gradient.

    python benchmarks/hvp.py            # full
    python benchmarks/hvp.py --quick    # smoke (fewer repeats, smaller ResNet batch)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import hesd
from hesd.models import DigitsMLP, load_digits_tensors, resnet20

METHODS = ("graph", "double_backward", "func", "auto")


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _gradient_time(model, batches, repeats) -> float:
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def grad():
        for X, y in batches:
            torch.autograd.grad(nn.functional.cross_entropy(model(X), y), params)

    return _time(grad, repeats)


def bench(name: str, model: nn.Module, batches: list, repeats: int) -> list[dict]:
    g = _gradient_time(model, batches, repeats)
    rows = [{"model": name, "batches": len(batches), "method": "gradient", "seconds": g, "ratio": 1.0}]
    for method in METHODS:
        op = hesd.HessianOperator(model, nn.functional.cross_entropy, batches, hvp_method=method)
        v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0))
        op.prepare()
        s = _time(lambda op=op, v=v: op @ v, repeats)
        rows.append({"model": name, "batches": len(batches), "method": method, "seconds": s, "ratio": s / g,
                     "graph_MB": op.graph_bytes / 2**20})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 5
    cpu = platform.processor() or platform.machine()
    print(f"# hesd {hesd.__version__}, torch {torch.__version__}, {args.threads} threads, {cpu}")
    X, y, _, _ = load_digits_tensors()
    torch.manual_seed(0)
    rows = bench("digits MLP", DigitsMLP(), [(X, y)], repeats)
    rows += bench("digits MLP", DigitsMLP(), [(X[i : i + 256], y[i : i + 256]) for i in range(0, len(y), 256)], repeats)
    bs = 32 if args.quick else 128
    g = torch.Generator().manual_seed(0)
    Xr, yr = torch.randn(4 * bs, 3, 32, 32, generator=g), torch.randint(0, 10, (4 * bs,), generator=g)
    net = resnet20()
    rows += bench("ResNet-20", net, [(Xr[:bs], yr[:bs])], repeats)
    rows += bench("ResNet-20", net, [(Xr[i : i + bs], yr[i : i + bs]) for i in range(0, 4 * bs, bs)], repeats)
    print(f"{'model':<11} {'batches':>7} {'method':<16} {'seconds':>9} {'× gradient':>10} {'graph MB':>9}")
    for r in rows:
        mb = f"{r['graph_MB']:9.1f}" if "graph_MB" in r else " " * 9
        print(f"{r['model']:<11} {r['batches']:>7} {r['method']:<16} {r['seconds']:9.4f} {r['ratio']:10.2f} {mb}")


if __name__ == "__main__":
    main()
