"""Finite-difference products against exact ones: error, cost, and what they do to λmax, Ct and the verdict.

Models (random init unless said): the GPT-2 of ``transformer_families.py`` (hidden 64, 2 layers,
vocabulary 512, its own loss over 2 dict batches of 8 × 64 tokens with uneven padding); a tanh
MLP and a GELU CNN on the digits; the same CNN with ReLU (kinks). Each in float64 and float32.
Per model and dtype, in one run:

* the relative error ``‖Hv_fd − Hv‖ / ‖Hv‖`` of hesd's finite-difference product (default step)
  against the exact product of a float64 copy, over 4 random directions and the top eigenvector;
* the same for hessian-eigenthings 1.0's finite-difference product (its default step, its own
  autograd product as the reference, so that its equal batch weights do not count as error);
* seconds per product, finite differences and hesd's exact default (``"auto"``);
* a 30-step SLQ × 2 probes by both methods (same probes): λmin, λmax, Ct, KH05 and the MP/MN
  type.

    python benchmarks/finite_difference.py           # a few minutes on 2 CPU cores
    python benchmarks/finite_difference.py --quick   # smoke
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transformer_families import timed  # a sibling script


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:n], dtype=torch.float32) / 16.0
    return X, torch.tensor(y[:n])


def models(quick: bool):
    """(name, model, data, loss_fn) in float32, random init."""
    n = 256 if quick else 1024
    X, y = digits(n)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    data = [(X[i : i + 256], y[i : i + 256]) for i in range(0, n, 256)]
    images = [(a.view(-1, 1, 8, 8), b) for a, b in data]

    def cnn(act: type[nn.Module]) -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), act(), nn.Conv2d(8, 8, 3, padding=1), act(),
                             nn.Flatten(), nn.Linear(8 * 64, 10))  # fmt: skip

    out = [("MLP tanh", mlp, data, F.cross_entropy), ("CNN GELU", cnn(nn.GELU), images, F.cross_entropy),
           ("CNN ReLU", cnn(nn.ReLU), images, F.cross_entropy)]  # fmt: skip
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        from transformer_families import batches, build

        out.insert(0, ("GPT-2", build("gpt2").eval(), batches("gpt2", 1 if quick else 2), None))
    except ImportError:
        print("transformers not installed: GPT-2 left out")
    return out


def cast(data, dtype):
    def one(x):
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return [{k: one(v) for k, v in b.items()} if isinstance(b, dict) else tuple(one(t) for t in b) for b in data]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


def eigenthings_error(model, data, loss_fn, vectors) -> float | None:
    try:
        from hessian_eigenthings.operators.hessian import HessianOperator as EOp
    except ImportError:
        return None

    def fn(m, batch):
        if loss_fn is None:
            return m(**batch).loss
        return loss_fn(m(batch[0]), batch[1])

    exact = EOp(model, data, fn, method="autograd")
    fd = EOp(model, data, fn, method="finite_difference")
    with sdpa_kernel(SDPBackend.MATH):  # its autograd product cannot pass SDPA's fused CPU kernel
        refs = [exact.matvec(v) for v in vectors]
    return max(rel(fd.matvec(v), r) for v, r in zip(vectors, refs, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    steps, probes, repeats = (10, 1, 1) if a.quick else (30, 2, 3)
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; "
          f"SLQ {steps} steps x {probes} probes")  # fmt: skip
    print(f"{'model':<9} {'dtype':<7} {'P':>7} {'fd err':>8} {'fd err top':>10} {'eigenth.':>8} "
          f"{'fd s':>7} {'exact s':>7} {'fd/exact':>8} | {'λmax fd':>9} {'λmax':>9} {'Ct fd':>7} {'Ct':>7} "
          f"{'KH05 fd':>7} {'KH05':>7} type")  # fmt: skip
    for name, model32, data32, loss_fn in models(a.quick):
        ref_model = copy.deepcopy(model32).double()
        ref_data = cast(data32, torch.float64)
        exact64 = hesd.HessianOperator(ref_model, loss_fn, ref_data)
        top = hesd.eigenvalues(exact64, k=1, tol=1e-6, return_eigenvectors=True, warn=False)
        assert top.eigenvectors is not None
        g = torch.Generator().manual_seed(3)
        directions = [torch.randn(exact64.shape[0], generator=g, dtype=torch.float64) for _ in range(4)]
        directions = [d / d.norm() for d in directions]
        refs = [exact64 @ d for d in directions]
        ref_top = exact64 @ top.eigenvectors[:, 0]
        for dtype in (torch.float64, torch.float32):
            model = ref_model if dtype == torch.float64 else model32
            data = ref_data if dtype == torch.float64 else data32
            fd = hesd.HessianOperator(model, loss_fn, data, hvp_method="finite_difference")
            exact = hesd.HessianOperator(model, loss_fn, data)
            err = max(rel(fd @ d.to(dtype), r) for d, r in zip(directions, refs, strict=True))
            err_top = rel(fd @ top.eigenvectors[:, 0].to(dtype), ref_top)
            e_err = eigenthings_error(model, data, loss_fn, [d.to(dtype) for d in directions])
            v = directions[0].to(dtype)
            t_fd, t_exact = timed(lambda fd=fd, v=v: fd @ v, repeats), timed(lambda ex=exact, v=v: ex @ v, repeats)
            spec_fd = hesd.slq(fd, steps, probes, seed=0)
            spec = hesd.slq(exact, steps, probes, seed=0)
            c_fd, c = hesd.criteria(spec_fd), hesd.criteria(spec)
            types = f"{c_fd.hesd_type}/{c.hesd_type}"
            e_txt = f"{e_err:8.1e}" if e_err is not None else f"{'-':>8}"
            print(f"{name:<9} {str(dtype)[6:]:<7} {fd.shape[0]:>7} {err:8.1e} {err_top:10.1e} {e_txt} "
                  f"{t_fd:7.3f} {t_exact:7.3f} {t_fd / t_exact:8.2f} | {c_fd.lambda_max:9.4g} {c.lambda_max:9.4g} "
                  f"{c_fd.ct:7.3f} {c.ct:7.3f} {c_fd.kh05:7.3f} {c.kh05:7.3f} {types}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
