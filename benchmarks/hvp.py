"""Time one gradient and one Hessian-vector product by each method, measured in one run.

Models: the digits MLP (all 1348 training images, one batch) and a CIFAR-shaped ResNet-20
(random data, BatchNorm in eval mode, batches of 128). For each: a single batch and a data
set of several batches. Prints seconds per product and the ratio to one gradient. Rows
"×8 block" multiply a block of 8 vectors in one batched pass (``batch_columns=8``) and give
the time per product, so their ratio to the single-vector row is the gain of batching.
Rows ", BatchNorm native" (models with BatchNorm) keep PyTorch's ``batch_norm`` kernel in the
products instead of hesd's default affine form (``eval_batchnorm``).

    python benchmarks/hvp.py                  # full
    python benchmarks/hvp.py --quick          # smoke (fewer repeats, smaller ResNet batch)
    python benchmarks/hvp.py --device cuda    # on a GPU
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
from hesd.operators.batchnorm import has_running_stat_batchnorm

METHODS = ("graph", "double_backward", "func", "auto")


def _time(fn, repeats: int) -> float:
    cuda = torch.cuda.is_available()
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _gradient_time(model, batches, repeats) -> float:
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def grad():
        for X, y in batches:
            torch.autograd.grad(nn.functional.cross_entropy(model(X), y), params)

    return _time(grad, repeats)


def bench(name: str, model: nn.Module, batches: list, repeats: int, device: torch.device) -> list[dict]:
    model = model.to(device)
    batches = [(X.to(device), y.to(device)) for X, y in batches]
    g = _gradient_time(model, batches, repeats)
    rows = [{"model": name, "batches": len(batches), "method": "gradient", "seconds": g, "ratio": 1.0}]
    runs = [(m, 1, "affine") for m in METHODS] + [("graph", 8, "affine"), ("func", 8, "affine"), ("auto", 8, "affine")]
    if has_running_stat_batchnorm(model):
        # PyTorch's own BatchNorm kernel in the products, against hesd's default affine form.
        runs += [("graph", 1, "native"), ("double_backward", 1, "native")]
    for method, block, bn in runs:
        op = hesd.HessianOperator(model, nn.functional.cross_entropy, batches, hvp_method=method, batch_columns=block,
                                  eval_batchnorm=bn)  # fmt: skip
        V = torch.randn(op.shape[0], block, generator=torch.Generator().manual_seed(0)).to(device)
        op.prepare()
        s = _time(lambda op=op, V=V: op @ V, repeats) / block
        label = method if block == 1 else f"{method} ×{block} block"
        if method == "auto" and block > 1:
            label += f" ({op.block_method})"
        if bn == "native":
            label += ", BatchNorm native"
        rows.append({"model": name, "batches": len(batches), "method": label, "seconds": s, "ratio": s / g,
                     "graph_MB": op.graph_bytes / 2**20})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="mlp,resnet20", help="comma list: mlp,resnet20")
    args = ap.parse_args()
    models = args.models.split(",")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 2 if args.quick else 5
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# hesd {hesd.__version__}, torch {torch.__version__}, {args.threads} threads, {where}")
    rows = []
    if "mlp" in models:
        X, y, _, _ = load_digits_tensors()
        torch.manual_seed(0)
        rows += bench("digits MLP", DigitsMLP(), [(X, y)], repeats, device)
        mlp_batches = [(X[i : i + 256], y[i : i + 256]) for i in range(0, len(y), 256)]
        rows += bench("digits MLP", DigitsMLP(), mlp_batches, repeats, device)
    if "resnet20" in models:
        bs = 32 if args.quick else 128
        g = torch.Generator().manual_seed(0)
        Xr, yr = torch.randn(4 * bs, 3, 32, 32, generator=g), torch.randint(0, 10, (4 * bs,), generator=g)
        net = resnet20()
        rows += bench("ResNet-20", net, [(Xr[:bs], yr[:bs])], repeats, device)
        rn_batches = [(Xr[i : i + bs], yr[i : i + bs]) for i in range(0, 4 * bs, bs)]
        rows += bench("ResNet-20", net, rn_batches, repeats, device)
    print(f"{'model':<11} {'batches':>7} {'method':<34} {'seconds':>9} {'× gradient':>10} {'graph MB':>9}")
    for r in rows:
        mb = f"{r['graph_MB']:9.1f}" if "graph_MB" in r else " " * 9
        print(f"{r['model']:<11} {r['batches']:>7} {r['method']:<34} {r['seconds']:9.5f} {r['ratio']:10.2f} {mb}")


if __name__ == "__main__":
    main()
