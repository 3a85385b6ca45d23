"""Where hesd's time goes: cProfile of one task on ResNet-20 or the digits MLP, any device.

    python benchmarks/profile_hesd.py --task trace --device cuda
    python benchmarks/profile_hesd.py --task slq8 --model mlp

Tasks: ``trace`` (Hutch++, 60 products in blocks of 8), ``slq8`` (8 probes × 50 steps in
lockstep), ``slq1`` (1 probe × 100 steps), ``top5`` (restarted Lanczos). The task runs
twice on one operator: the first (cold) run includes one-off costs (lazy imports, CUDA
kernel selection, ``auto``'s choice of block method); the second is profiled. Prints both
wall times, the products, the block method and the functions with the most own time.

``--task overhead`` profiles nothing: it times, interleaved in rounds (min and median over
``--rounds``), the bare ``torch.autograd.grad`` call through a kept first-order graph with one
vector per parameter (the call PyHessian makes), hesd's ``op @ v``, and one step of
fixed-step SLQ (100 steps, with full re-orthogonalisation and without). The differences are
hesd's per-product and per-step overhead, which only millisecond products (the digits MLP)
notice.

``--task lanczos`` times the Lanczos step itself: 100 steps of fixed-step SLQ (full
re-orthogonalisation and none) against a free diagonal operator of the model's size, so the
products cost microseconds and what is left is the step's own work. Next to a real product
the step costs more, because the product evicts the stored basis from the cache.
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


def overhead(op: hesd.HessianOperator, model, X, y, rounds: int) -> None:
    import compare

    sync = torch.cuda.synchronize if compare.DEVICE.type == "cuda" else (lambda: None)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(CE(model(X), y), params, create_graph=True)
    vs = [torch.randn_like(p) for p in params]
    v = torch.randn(op.shape[0], dtype=X.dtype, device=X.device)
    calls = max(1, int(0.2 / max(1e-6, _once(lambda: op @ v, sync))))  # about 0.2 s per timing
    steps = 100

    def bare():
        return torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)

    fns = {
        "bare torch.autograd.grad": (bare, calls),
        "hesd op @ v": (lambda: op @ v, calls),
        "hesd fixed-step SLQ, per step": (lambda: hesd.slq(op, steps, 1, seed=0), max(1, calls // steps)),
        "  same, reorth='none'": (lambda: hesd.slq(op, steps, 1, seed=0, reorth="none"), max(1, calls // steps)),
    }
    for fn, _ in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, (fn, n) in fns.items():
            sync()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            per = (time.perf_counter() - t) / n
            times[name].append(per / steps if "SLQ" in name or "reorth" in name else per)
    print(f"# per-product overhead, {compare.DEVICE}, {op.shape[0]} parameters; {rounds} interleaved rounds")
    base = min(times["bare torch.autograd.grad"])
    for name, ts in times.items():
        ts.sort()
        print(f"{name:<32} min {ts[0] * 1e6:9.1f} µs  median {ts[len(ts) // 2] * 1e6:9.1f} µs  "
              f"min / bare {ts[0] / base:5.3f}")  # fmt: skip
    hv, sl = min(times["hesd op @ v"]), min(times["hesd fixed-step SLQ, per step"])
    none = min(times["  same, reorth='none'"])
    print(
        f"fixed-step SLQ per step / one op @ v: {sl / hv:.3f} (full re-orthogonalisation {(sl - none) * 1e6:.0f} µs "
        f"of it, the rest of the Lanczos step {(none - hv) * 1e6:.0f} µs)"
    )


class _Diagonal(hesd.LinearOperator):
    """``diag(d)``: a product costs one elementwise multiplication."""

    def __init__(self, d: torch.Tensor) -> None:
        self.d, self.shape, self.dtype, self.device = d, (d.numel(), d.numel()), d.dtype, d.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += V.shape[1]
        return self.d[:, None] * V


def lanczos_step(n: int, dtype: torch.dtype, device: torch.device, rounds: int) -> None:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    d = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 3
    op = _Diagonal(d.to(device=device, dtype=dtype))
    steps = 100
    times: dict[str, list[float]] = {"full": [], "none": []}
    for name in times:
        hesd.slq(op, steps, 1, seed=0, reorth=name)  # warm-up
    for _ in range(rounds):
        for name, ts in times.items():
            sync()
            t = time.perf_counter()
            hesd.slq(op, steps, 1, seed=0, reorth=name)
            sync()
            ts.append((time.perf_counter() - t) / steps)
    print(f"# Lanczos step with a free operator, {device}, {n} parameters, {dtype}; {steps} steps, {rounds} rounds")
    for name, ts in times.items():
        ts.sort()
        print(f"reorth={name!r:<8} min {ts[0] * 1e6:9.1f} µs a step  median {ts[len(ts) // 2] * 1e6:9.1f} µs")


def _once(fn, sync) -> float:
    fn()
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="trace", choices=("trace", "slq8", "slq1", "top5", "overhead", "lanczos"))
    ap.add_argument("--rounds", type=int, default=15, help="timing rounds for --task overhead and lanczos")
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
    if args.task == "lanczos":
        lanczos_step(op.shape[0], op.dtype, op.device, args.rounds)
        return
    if args.task == "overhead":
        overhead(op, model, X, y, args.rounds)
        return
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
