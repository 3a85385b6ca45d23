"""The CPU's choice of block width (``HessianOperator(batch_columns=None)``), end to end.

Hutch++ with 60 products (blocks of 8 columns reach the operator) on a fresh, prepared
operator per setting: ``batch_columns=None`` (the CPU default: the first block decides between
one column per pass and blocks of 8, trial included in the time), ``1`` and ``8``. Prints
seconds, the chosen width and the per-product times the choice was made on, for the digits MLP
over one batch and over 6 batches, and for ResNet-20 (one batch of 128).

    python benchmarks/columns.py             # full (about 3 minutes on 2 CPU threads)
    python benchmarks/columns.py --quick     # smoke (MLP only)
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import hesd
from hesd.models import DigitsMLP, load_digits_tensors, resnet20


def run(name: str, model: nn.Module, batches: list, repeats: int) -> None:
    for setting in (1, 8):  # untimed: the process's first batched backward and trace pay one-off costs
        hesd.trace(hesd.HessianOperator(model, nn.functional.cross_entropy, batches, batch_columns=setting),
                   "hutchpp", num_matvecs=16, seed=1)  # fmt: skip
    for setting in (None, 1, 8):
        times, chosen, timings = [], None, {}
        for _ in range(repeats):
            op = hesd.HessianOperator(model, nn.functional.cross_entropy, batches, batch_columns=setting)
            op.prepare()
            t = time.perf_counter()
            hesd.trace(op, "hutchpp", num_matvecs=60, seed=0)
            times.append(time.perf_counter() - t)
            chosen, timings = op.batch_columns, op.column_timings
        shown = ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in timings.items())
        print(f"{name:<24} batch_columns={setting!s:<5} {min(times):8.3f} s (min of {repeats})  "
              f"width used {chosen}  {shown}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# hesd {hesd.__version__}, torch {torch.__version__}, {args.threads} threads; Hutch++, 60 products")
    X, y, _, _ = load_digits_tensors()
    torch.manual_seed(0)
    mlp = DigitsMLP()
    repeats = 1 if args.quick else 3
    run("digits MLP, 1 batch", mlp, [(X, y)], repeats)
    run("digits MLP, 6 batches", mlp, [(X[i : i + 256], y[i : i + 256]) for i in range(0, len(y), 256)], repeats)
    if not args.quick:
        g = torch.Generator().manual_seed(0)
        Xr, yr = torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
        torch.manual_seed(0)
        run("ResNet-20, 1 batch", resnet20(), [(Xr, yr)], 1)


if __name__ == "__main__":
    main()
