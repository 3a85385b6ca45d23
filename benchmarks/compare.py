"""hesd against PyHessian, curvlinops and hessian-eigenthings: same model, data and accuracy target.

    pip install -e ".[bench]"           # the competitors (never a runtime dependency of hesd)
    python benchmarks/compare.py        # digits MLP and ResNet-20, every tool, every task
    python benchmarks/compare.py --quick --tools hesd   # CI smoke

Every (tool, task, model) runs in a fresh subprocess, so its peak memory (VmHWM) is its own;
the time excludes start-up, model and data construction. Products are counted at the
operator. References are converged float64 hesd runs (top-5: restarted Lanczos to a
relative residual of 1e-7 (``--ref-eig-tol``; Weyl: each value within that of a true one);
trace: the exact trace via P products on the MLP, float32 Hutch++ with ``--ref-trace-matvecs``
products ± its standard error on ResNet-20; verdict: ``--ref-steps``-step SLQ, same probe).

PyHessian 0.1 (the release on the package index) calls ``torch.eig``, removed from PyTorch;
the minimal shim below (``_shim_torch_eig``, clearly marked) maps it to ``torch.linalg.eigh``
(valid: PyHessian only applies it to its symmetric tridiagonal).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
from torch import nn

CE = nn.functional.cross_entropy
TOOLS = ("hesd", "pyhessian", "curvlinops", "eigenthings")
TASKS = ("hvp", "top5", "trace", "verdict")


# --------------------------------------------------------------------------------------------- set-up
def _vm(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return math.nan


def make(model_name: str, dtype=torch.float32):
    from hesd.models import DigitsMLP, load_digits_tensors, resnet20

    torch.manual_seed(0)
    if model_name == "mlp":
        X, y, _, _ = load_digits_tensors(dtype=dtype)
        model = DigitsMLP().to(dtype)
    else:
        g = torch.Generator().manual_seed(0)
        X = torch.randn(128, 3, 32, 32, generator=g, dtype=dtype)
        y = torch.randint(0, 10, (128,), generator=g)
        model = resnet20().to(dtype)
    model.eval()
    return model, X, y


def _shim_torch_eig() -> None:
    """SHIM for PyHessian 0.1: ``torch.eig`` was removed from PyTorch; PyHessian calls it on a
    symmetric tridiagonal, for which ``torch.linalg.eigh`` is the correct replacement. (torch 2.13
    still has a ``torch.eig`` stub that only raises, so it is replaced unconditionally.)"""

    def eig(A, eigenvectors=False):
        w, V = torch.linalg.eigh(A)
        return torch.stack([w, torch.zeros_like(w)], dim=1), (V if eigenvectors else torch.empty(0))

    torch.eig = eig


class Counter:
    n = 0


def time_per_call(fn, repeats: int, min_seconds: float = 0.5) -> float:
    """Seconds per call: at least ``repeats`` calls and at least ``min_seconds`` in all (ms-scale HVPs)."""
    calls, t = 0, time.perf_counter()
    while calls < repeats or time.perf_counter() - t < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - t) / calls


# --------------------------------------------------------------------------------------------- workers
def run_hesd(task: str, model, X, y, args) -> dict:
    import hesd
    from hesd.analysis.criteria import probe_summary

    op = hesd.HessianOperator(model, CE, (X, y))
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0), dtype=X.dtype)
    op @ v  # warm-up (and the one-off preparation pass), as for every tool
    op.num_matvecs = 0
    t = time.perf_counter()
    if task == "hvp":
        return {"seconds": time_per_call(lambda: op @ v, args.repeats), "hvps": 1}
    if task == "top5":
        r = hesd.eigenvalues(op, k=5, which="LA", tol=args.eig_tol, seed=0)
        return {"seconds": time.perf_counter() - t, "hvps": r.num_matvecs, "values": r.eigenvalues.tolist()}
    if task == "trace":
        r = hesd.trace(op, "hutchpp", num_matvecs=args.trace_matvecs, seed=0)
        seconds = time.perf_counter() - t  # Hutch++ only; the Hutchinson run below is for the comparison
        rh = hesd.trace(op, "hutchinson", num_matvecs=args.trace_matvecs, seed=1)
        # Hutchinson products needed for Hutch++'s standard error: (sample std / stderr)^2.
        std_h = float(rh.samples.std(unbiased=True))
        return {"seconds": seconds, "hvps": r.num_matvecs, "estimate": r.estimate,
                "stderr": r.stderr, "hutchinson_stderr": rh.stderr,
                "hutchinson_hvps_for_same_stderr": (std_h / r.stderr) ** 2}  # fmt: skip
    if task == "verdict":
        out = {}
        s = hesd.slq(op, args.verdict_cap, 1, seed=0, stop_tol=args.stop_tol, stop_on=probe_summary)
        out["seconds"] = time.perf_counter() - t
        out["hvps"] = s.num_matvecs
        c = hesd.criteria(s)
        out.update(ct=c.ct, re=c.re, kh05=c.kh05, hesd_type=c.hesd_type, steps=s.info["steps_used"])
        t = time.perf_counter()
        s100 = hesd.slq(op, 100, 1, seed=0)
        out["fixed100_seconds"] = time.perf_counter() - t
        c100 = hesd.criteria(s100)
        out.update(fixed100_ct=c100.ct, fixed100_re=c100.re, fixed100_kh05=c100.kh05)
        out["one_hvp_seconds"] = time_per_call(lambda: op @ v, 5)
        return out
    raise ValueError(task)


def run_pyhessian(task: str, model, X, y, args) -> dict:
    _shim_torch_eig()
    import pyhessian  # noqa: F401

    ph = sys.modules["pyhessian.hessian"]
    orig = ph.hessian_vector_product

    def counted(*a, **k):
        Counter.n += 1
        return orig(*a, **k)

    ph.hessian_vector_product = counted
    comp = ph.hessian(model, CE, data=(X, y), cuda=False)
    orig(comp.gradsH, comp.params, [torch.randn_like(p) for p in comp.params])  # warm-up
    t = time.perf_counter()
    if task == "hvp":
        v = [torch.randn_like(p) for p in comp.params]
        return {"seconds": time_per_call(lambda: orig(comp.gradsH, comp.params, v), args.repeats), "hvps": 1}
    if task == "top5":
        vals, _ = comp.eigenvalues(top_n=5, tol=1e-3)
        return {"seconds": time.perf_counter() - t, "hvps": Counter.n, "values": sorted(vals, reverse=True)}
    if task == "trace":
        vals = comp.trace(tol=1e-3)
        n = len(vals)
        est = float(sum(vals) / n)
        se = float(torch.tensor(vals).std() / math.sqrt(n)) if n > 1 else math.nan
        return {"seconds": time.perf_counter() - t, "hvps": Counter.n, "estimate": est, "stderr": se}
    if task == "verdict":
        import hesd

        eig, w = comp.density(iter=100, n_v=1)
        sec = time.perf_counter() - t
        c = hesd.criteria(hesd.Spectrum.from_ritz(eig, w))
        return {"seconds": sec, "hvps": Counter.n, "ct": c.ct, "re": c.re, "kh05": c.kh05, "hesd_type": c.hesd_type}
    raise ValueError(task)


def run_curvlinops(task: str, model, X, y, args) -> dict:
    import curvlinops
    from scipy.sparse.linalg import eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    op = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, y)])
    n = sum(p.numel() for p in params)
    op @ torch.randn(n, dtype=X.dtype)  # warm-up
    orig = op._matmat

    def counted(M):
        first = M[0] if isinstance(M, (list, tuple)) else M
        Counter.n += first.shape[-1]  # columns (curvlinops passes a list of per-parameter blocks)
        return orig(M)

    op._matmat = counted
    t = time.perf_counter()
    if task == "hvp":
        v = torch.randn(n, dtype=X.dtype)
        return {"seconds": time_per_call(lambda: op @ v, args.repeats), "hvps": 1}
    if task == "top5":
        vals = eigsh(op.to_scipy(), k=5, which="LA", tol=1e-3, return_eigenvectors=False)
        return {"seconds": time.perf_counter() - t, "hvps": Counter.n, "values": sorted(vals.tolist(), reverse=True)}
    if task == "trace":
        torch.manual_seed(0)
        est = float(curvlinops.hutchpp_trace(op, num_matvecs=args.trace_matvecs))
        return {"seconds": time.perf_counter() - t, "hvps": Counter.n, "estimate": est, "stderr": math.nan}
    if task == "verdict":
        return {"skipped": "curvlinops' density has no Ritz weights per probe to compute the criteria on"}
    raise ValueError(task)


def run_eigenthings(task: str, model, X, y, args) -> dict:
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [(X, y)], he.supervised_loss(CE))
    op.matvec(torch.randn(sum(p.numel() for p in model.parameters()), dtype=X.dtype))  # warm-up
    orig = op.matvec

    def counted(v):
        Counter.n += 1
        return orig(v)

    op.matvec = counted
    n = sum(p.numel() for p in model.parameters())
    t = time.perf_counter()
    if task == "hvp":
        v = torch.randn(n, dtype=X.dtype)
        return {"seconds": time_per_call(lambda: orig(v), args.repeats), "hvps": 1}
    if task == "top5":
        # reorthogonalize=True: without it, its Lanczos returns ghost copies of λmax as the
        # iteration count grows (5 × λmax after 120 steps on the digits MLP) with converged=True.
        r = he.lanczos(op, k=5, which="LA", tol=1e-3, seed=0, max_iter=args.eigenthings_iter, reorthogonalize=True)
        return {"seconds": time.perf_counter() - t, "hvps": Counter.n,
                "values": sorted(r.eigenvalues.tolist(), reverse=True),
                "converged": bool(torch.as_tensor(r.converged).all())}  # fmt: skip
    if task == "trace":
        r = he.hutch_plus_plus(op, num_matvecs=args.trace_matvecs, seed=0)
        return {"seconds": time.perf_counter() - t, "hvps": Counter.n, "estimate": r.estimate, "stderr": r.stderr}
    if task == "verdict":
        return {"skipped": "not run: its density reports no per-probe Ritz weights"}
    raise ValueError(task)


def worker(tool: str, task: str, model_name: str, args) -> None:
    torch.set_num_threads(args.threads)
    model, X, y = make(model_name)
    base = _vm("VmRSS")
    fn = {"hesd": run_hesd, "pyhessian": run_pyhessian, "curvlinops": run_curvlinops, "eigenthings": run_eigenthings}
    out = fn[tool](task, model, X, y, args)
    out.update(peak_mb=_vm("VmHWM"), extra_mb=_vm("VmHWM") - base)
    print("RESULT " + json.dumps(out))


def reference(model_name: str, args) -> dict:
    import hesd

    torch.set_num_threads(args.threads)
    model, X, y = make(model_name, getattr(torch, args.ref_dtype))
    op = hesd.HessianOperator(model, CE, (X, y))
    top = hesd.eigenvalues(op, k=5, which="LA", tol=args.ref_eig_tol, seed=1, max_matvecs=400, max_basis=80)
    ref = {
        "top5": top.eigenvalues.tolist(),
        "top5_residual": float(top.residuals.max()),
        "top5_matvecs": top.num_matvecs,
    }
    model32, X32, y32 = make(model_name)
    op32 = hesd.HessianOperator(model32, CE, (X32, y32))
    if model_name == "mlp":
        P = op.shape[0]
        eye = torch.eye(P, dtype=torch.float64)
        ref["trace"] = float(sum(float(torch.diagonal(op @ eye[:, i : i + 256], offset=-i).sum())
                                 for i in range(0, P, 256)))  # fmt: skip
        ref["trace_se"] = 0.0
    else:  # float32: float64 products on ResNet-20 cost ~1.5 s each
        tr = hesd.trace(op32, "hutchpp", num_matvecs=args.ref_trace_matvecs, seed=7)
        ref["trace"], ref["trace_se"] = tr.estimate, tr.stderr
    s = hesd.slq(op32, args.ref_steps, 1, seed=0)
    c = hesd.criteria(s)
    ref.update(ct=c.ct, re=c.re, kh05=c.kh05, hesd_type=c.hesd_type, steps=args.ref_steps)
    return ref


# --------------------------------------------------------------------------------------------- driver
def _spawn(argv: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def main() -> None:
    ap = argparse.ArgumentParser(description="hesd vs PyHessian, curvlinops, hessian-eigenthings")
    ap.add_argument("--quick", action="store_true", help="digits MLP only, small budgets (CI smoke)")
    ap.add_argument("--models", default=None, help="comma list: mlp,resnet20")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eig-tol", type=float, default=1e-3)
    ap.add_argument("--trace-matvecs", type=int, default=60)
    ap.add_argument("--verdict-cap", type=int, default=100)
    ap.add_argument("--stop-tol", type=float, default=1e-3)
    ap.add_argument("--ref-steps", type=int, default=300)
    ap.add_argument("--ref-trace-matvecs", type=int, default=600)
    ap.add_argument("--ref-eig-tol", type=float, default=1e-7, help="relative residual of the top-5 reference")
    ap.add_argument("--ref-dtype", default="float64", help="dtype of the top-5 reference (float32 for ResNet-20)")
    ap.add_argument(
        "--eigenthings-iter",
        type=int,
        default=60,
        help="Lanczos steps for hessian-eigenthings (its default, 10, misses 1e-3 by far)",
    )
    ap.add_argument("--json", help="also write all results to this file")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, args)
        return
    if args.reference:
        print("RESULT " + json.dumps(reference(args.reference, args)))
        return
    if args.quick:
        args.ref_steps, args.ref_trace_matvecs, args.repeats = 120, 120, 2
    models = (args.models or ("mlp" if args.quick else "mlp,resnet20")).split(",")
    tools, tasks = args.tools.split(","), args.tasks.split(",")
    passthrough = [f"--threads={args.threads}", f"--repeats={args.repeats}", f"--eig-tol={args.eig_tol}",
                   f"--trace-matvecs={args.trace_matvecs}", f"--verdict-cap={args.verdict_cap}",
                   f"--stop-tol={args.stop_tol}", f"--ref-steps={args.ref_steps}",
                   f"--ref-trace-matvecs={args.ref_trace_matvecs}", f"--eigenthings-iter={args.eigenthings_iter}",
                   f"--ref-eig-tol={args.ref_eig_tol}", f"--ref-dtype={args.ref_dtype}"]  # fmt: skip
    print(f"# torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores; one subprocess per cell")
    everything = {}
    for m in models:
        ref = _spawn(["--reference", m, *passthrough])
        res = {t: {k: _spawn(["--worker", t, k, m, *passthrough]) for k in tasks} for t in tools}
        everything[m] = {"reference": ref, "results": res}
        _print_model(m, ref, res, tools, tasks)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1)


def _fmt(x, spec=".3g"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _print_model(m: str, ref: dict, res: dict, tools, tasks) -> None:
    print(f"\n## {m}")
    if "error" in ref:
        print(f"reference failed: {ref['error']}")
        return
    hesd_row = res.get("hesd", {})
    if "hvp" in tasks:
        print("\n### one Hessian-vector product")
        print(f"{'tool':<12} {'seconds':>9} {'vs hesd':>8} {'peak MB':>8}")
        for t in tools:
            r = res[t]["hvp"]
            if "seconds" in r:
                ratio = r["seconds"] / hesd_row.get("hvp", {}).get("seconds", math.nan)
                print(f"{t:<12} {r['seconds']:9.4f} {ratio:8.2f} {r['peak_mb']:8.0f}")
            else:
                print(f"{t:<12} {r.get('error', r.get('skipped'))}")
    if "top5" in tasks:
        print(f"\n### top-5 eigenvalues (reference {', '.join(f'{v:.5g}' for v in ref['top5'])}; residual "
              f"{ref['top5_residual']:.1e}, {ref['top5_matvecs']} HVPs)")  # fmt: skip
        print(f"{'tool':<12} {'seconds':>8} {'HVPs':>5} {'max rel err':>11} {'hesd faster':>11} {'peak MB':>8}")
        hs = hesd_row.get("top5", {}).get("seconds", math.nan)
        for t in tools:
            r = res[t]["top5"]
            if "values" not in r:
                print(f"{t:<12} {r.get('error', r.get('skipped'))}")
                continue
            err = max(abs(a - b) / abs(b) for a, b in zip(r["values"], ref["top5"], strict=False))
            print(f"{t:<12} {r['seconds']:8.2f} {r['hvps']:5d} {err:11.2e} {r['seconds'] / hs:10.1f}x "
                  f"{r['peak_mb']:8.0f}")  # fmt: skip
    if "trace" in tasks:
        print(f"\n### trace (reference {ref['trace']:.6g} ± {ref['trace_se']:.2g})")
        print(f"{'tool':<12} {'seconds':>8} {'HVPs':>5} {'estimate':>10} {'stderr':>8} {'rel err':>8} {'peak MB':>8}")
        for t in tools:
            r = res[t]["trace"]
            if "estimate" not in r:
                print(f"{t:<12} {r.get('error', r.get('skipped'))}")
                continue
            err = abs(r["estimate"] - ref["trace"]) / abs(ref["trace"])
            print(f"{t:<12} {r['seconds']:8.2f} {r['hvps']:5d} {r['estimate']:10.5g} {_fmt(r.get('stderr')):>8} "
                  f"{err:8.2%} {r['peak_mb']:8.0f}")  # fmt: skip
        h = hesd_row.get("trace", {})
        if "hutchinson_hvps_for_same_stderr" in h:
            need = h["hutchinson_hvps_for_same_stderr"]
            print(f"Hutch++ stderr {h['stderr']:.3g} with {h['hvps']} HVPs; Hutchinson needs ≈{need:.0f} HVPs for it "
                  f"({need / h['hvps']:.1f}x more)")  # fmt: skip
    if "verdict" in tasks:
        print(f"\n### HESD verdict (reference, {ref['steps']} steps: Ct {ref['ct']:.4f}, "
              f"re {ref['re']:.4f}, KH05 {ref['kh05']:.4f}, {ref['hesd_type']})")  # fmt: skip
        print(f"{'tool':<22} {'seconds':>8} {'HVPs':>5} {'Ct':>8} {'re':>8} {'KH05':>7} {'type':>4} {'peak MB':>8}")
        for t in tools:
            r = res[t]["verdict"]
            if "ct" not in r:
                print(f"{t:<22} {r.get('error', r.get('skipped'))}")
                continue
            label = "hesd (adaptive)" if t == "hesd" else f"{t} (100 steps)"
            print(f"{label:<22} {r['seconds']:8.2f} {r['hvps']:5d} {r['ct']:8.4f} {r['re']:8.4f} {r['kh05']:7.4f} "
                  f"{r['hesd_type']:>4} {r['peak_mb']:8.0f}")  # fmt: skip
            if t == "hesd":
                over = r["fixed100_seconds"] / (100 * r["one_hvp_seconds"])
                print(f"{'hesd (100 steps)':<22} {r['fixed100_seconds']:8.2f} {100:5d} {r['fixed100_ct']:8.4f} "
                      f"{r['fixed100_re']:8.4f} {r['fixed100_kh05']:7.4f}       (= {over:.2f} × 100 HVPs)")  # fmt: skip
        ph = res.get("pyhessian", {}).get("verdict", {})
        if "seconds" in ph and "seconds" in hesd_row.get("verdict", {}):
            print(f"hesd adaptive verdict {ph['seconds'] / hesd_row['verdict']['seconds']:.1f}x faster than "
                  "PyHessian's 100-step density")  # fmt: skip


if __name__ == "__main__":
    main()
