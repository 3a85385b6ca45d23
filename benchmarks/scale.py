"""GPT-2 at about 10 M, 40 M and 124 M parameters: hesd beside PyHessian, curvlinops and hessian-eigenthings 1.0.

Random init from configs (vocabulary 50 257, 128 positions), one batch of 4 × 128 tokens, the
model's own loss (the peers: its shifted cross-entropy over the logits, the same loss). Each
(tool, size) runs in a fresh process, so that its peak resident memory (``ru_maxrss``) is its
own. Per run, as far as the tool can go:

* ``grad s`` — one gradient; ``HVP s`` — one product (hesd: first-order graph kept; eigenthings:
  its autograd product); ``FD s`` — one finite-difference product (hesd, eigenthings);
* ``top-1`` — the largest eigenvalue at tolerance 1e-3: seconds, products, and its relative
  error against hesd's value at 1e-6 (hesd runs first and hands it on);
* ``SLQ s`` — a 30-step SLQ probe (hesd: under the memory plan for ``--max-memory``, which it
  prints; PyHessian ``density(iter=30)``; eigenthings ``spectral_density``; curvlinops has no
  per-probe Ritz weights);
* ``RSS GiB`` — peak resident memory of the process; for hesd also the plan's estimate against
  the measured growth of resident memory during the analysis.

The peers need SDPA's math kernel (``attn_implementation="eager"``): the fused CPU kernel
``transformers`` picks has no second derivative and no forward-mode rule.

    python benchmarks/scale.py --sizes 10M 40M 124M          # hours on 2 CPU cores
    python benchmarks/scale.py --quick                        # smoke: a 1 M model, hesd only
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

SIZES = {"1M": (64, 2, 2, 512), "10M": (192, 4, 4, 50257), "40M": (512, 4, 8, 50257), "124M": (768, 12, 12, 50257)}
TOOLS = ("hesd", "eigenthings", "pyhessian", "curvlinops")
LENGTH, ROWS, STEPS = 128, 4, 30


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def build(size: str, eager: bool):
    import transformers as tf

    tf.utils.logging.set_verbosity_error()
    hidden, layers, heads, vocab = SIZES[size]
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=vocab, n_positions=LENGTH, n_embd=hidden, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    if eager:
        cfg._attn_implementation = "eager"
    model = tf.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, vocab, (ROWS, LENGTH), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids.clone()}


class Logits(nn.Module):
    """``ids -> shifted logits (N, V)`` for tools that take ``criterion(model(x), y)``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.lm(input_ids=ids).logits[:, :-1]
        return out.reshape(-1, out.shape[-1])


def partial(r: dict) -> None:
    """What a run has measured so far (the parent reports it if the run is cut short)."""
    print("PARTIAL " + json.dumps({k: v for k, v in r.items() if k != "plan"} | {"RSS GiB": rss_gib(),
          "plan": r.get("plan", "")}), flush=True)  # fmt: skip


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_hesd(size: str, a) -> dict:
    import hesd
    from hesd.analysis.memory_plan import plan_memory

    model, batch = build(size, eager=False)
    data = [batch]
    r: dict = {"P": sum(p.numel() for p in model.parameters())}
    before = current_rss()  # the planned analysis first, so that the process's peak is its own
    plan = plan_memory(model, None, data, num_steps=STEPS, max_memory=a.max_memory)
    r["plan"], r["plan GiB"] = plan.describe(), plan.total / 2**30

    def slq():
        op = hesd.HessianOperator(model, None, data, **plan.operator_kwargs())
        return hesd.slq(op, STEPS, 1, seed=0, **plan.slq_kwargs())

    spec, r["SLQ s"] = timed(slq)
    r["SLQ λmax"] = float(max(spec.values[0]))
    r["grown GiB"] = (rss_gib() * 2**30 - before) / 2**30
    r["SLQ RSS GiB"] = rss_gib()
    partial(r)
    params = list(model.parameters())
    _, r["grad s"] = timed(lambda: torch.autograd.grad(model(**batch).loss, params))
    op = hesd.HessianOperator(model, None, data, **plan.operator_kwargs())  # within the plan's memory
    v = torch.randn(op.shape[0])
    op @ v  # first-order pass (graphs kept as the plan allows)
    _, r["HVP s"] = timed(lambda: op @ v)
    fd = hesd.HessianOperator(model, None, data, hvp_method="finite_difference", check_deterministic=False)
    fd @ v
    _, r["FD s"] = timed(lambda fd=fd: fd @ v)
    del fd
    partial(r)
    n0 = op.num_matvecs
    basis = plan.eigen_basis  # the restarted Lanczos basis within the plan's basis memory
    top, r["top-1 s"] = timed(lambda: hesd.eigenvalues(op, k=1, tol=1e-3, warn=False, max_basis=basis))
    r["top-1 HVPs"], r["top-1"] = op.num_matvecs - n0, float(top.eigenvalues[0])
    partial(r)
    r["reference"] = float(hesd.eigenvalues(op, k=1, tol=a.ref_tol, warn=False, max_basis=basis).eigenvalues[0])
    return r


def run_eigenthings(size: str, a) -> dict:
    import hessian_eigenthings as he

    model, batch = build(size, eager=True)
    r: dict = {}
    params = list(model.parameters())
    _, r["grad s"] = timed(lambda: torch.autograd.grad(model(**batch).loss, params))
    op = he.HessianOperator(model, [batch], he.hf_lm_loss())
    fd = he.HessianOperator(model, [batch], he.hf_lm_loss(), method="finite_difference")
    v = torch.randn(op.size)
    _, r["HVP s"] = timed(lambda: op.matvec(v))
    _, r["FD s"] = timed(lambda: fd.matvec(v))
    res, r["top-1 s"] = timed(lambda: he.lanczos(op, k=1, max_iter=20, which="LA", tol=1e-3, seed=0))
    r["top-1 HVPs"], r["top-1"] = 20, float(res.eigenvalues[0])
    _, r["SLQ s"] = timed(lambda: he.spectral_density(op, num_runs=1, lanczos_steps=STEPS, seed=0))
    return r


def run_pyhessian(size: str, a) -> dict:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from compare import _shim_torch_eig

    _shim_torch_eig()
    import pyhessian  # noqa: F401

    ph = sys.modules["pyhessian.hessian"]
    lm, batch = build(size, eager=True)
    model = Logits(lm)
    ids = batch["input_ids"]
    y = ids[:, 1:].reshape(-1)
    r: dict = {}
    comp, r["grad s"] = timed(lambda: ph.hessian(model, F.cross_entropy, data=(ids, y), cuda=False))
    vv = [torch.randn_like(p) for p in comp.params]
    _, r["HVP s"] = timed(lambda: ph.hessian_vector_product(comp.gradsH, comp.params, vv))
    calls = [0]
    orig = ph.hessian_vector_product

    def counted(*x, **k):
        calls[0] += 1
        return orig(*x, **k)

    ph.hessian_vector_product = counted
    vals, r["top-1 s"] = timed(lambda: comp.eigenvalues(top_n=1, tol=1e-3, maxIter=100)[0])
    r["top-1 HVPs"], r["top-1"] = calls[0], float(vals[0])
    _, r["SLQ s"] = timed(lambda: comp.density(iter=STEPS, n_v=1))
    return r


def run_curvlinops(size: str, a) -> dict:
    import curvlinops
    from scipy.sparse.linalg import eigsh

    lm, batch = build(size, eager=True)
    model = Logits(lm)
    ids = batch["input_ids"]
    y = ids[:, 1:].reshape(-1)
    params = [p for p in model.parameters() if p.requires_grad]
    r: dict = {}
    op = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(ids, y)])
    v = torch.randn(sum(p.numel() for p in params))
    _, r["HVP s"] = timed(lambda: op @ v)
    calls = [0]
    orig = op._matmat

    def counted(M):
        first = M[0] if isinstance(M, (list, tuple)) else M
        calls[0] += first.shape[-1]
        return orig(M)

    op._matmat = counted
    vals, r["top-1 s"] = timed(lambda: eigsh(op.to_scipy(), k=1, which="LA", tol=1e-3, return_eigenvectors=False))
    r["top-1 HVPs"], r["top-1"] = calls[0], float(vals[0])
    return r


def child(tool: str, size: str, a) -> None:
    torch.set_num_threads(a.threads)
    try:
        r = {"hesd": run_hesd, "eigenthings": run_eigenthings, "pyhessian": run_pyhessian,
             "curvlinops": run_curvlinops}[tool](size, a)  # fmt: skip
    except Exception as exc:  # a tool that cannot run here: say why
        r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
    r["RSS GiB"] = rss_gib()
    print("RESULT " + json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["10M", "40M", "124M"], choices=list(SIZES))
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--max-memory", type=lambda s: int(float(s) * 2**30), default=10 * 2**30, help="GiB for hesd")
    ap.add_argument("--timeout", type=int, default=3 * 3600, help="seconds per (tool, size) run")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--ref-tol", type=float, default=1e-6, help="tolerance of hesd's reference λmax")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a)
        return
    if a.quick:
        a.sizes, a.tools, a.max_memory = ["1M"], ["hesd"], 2**30
    print(f"torch {torch.__version__}, {a.threads} threads; GPT-2, {ROWS} x {LENGTH} tokens, own loss; "
          f"hesd --max-memory {a.max_memory / 2**30:.1f} GiB", flush=True)  # fmt: skip
    cols = ["grad s", "HVP s", "FD s", "top-1 s", "top-1 HVPs", "top-1 err", "SLQ s", "RSS GiB"]
    print(f"{'size':<5} {'tool':<12} " + " ".join(f"{c:>10}" for c in cols), flush=True)
    for size in a.sizes:
        reference = math.nan
        for tool in a.tools:
            cmd = [sys.executable, __file__, "--child", tool, size, "--max-memory", str(a.max_memory / 2**30),
                   "--threads", str(a.threads), "--ref-tol", str(a.ref_tol)]  # fmt: skip
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                out, err = p.stdout, p.stderr
            except subprocess.TimeoutExpired as exc:
                out, err = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), ""
                err = f"did not finish in {a.timeout} s"
            lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
            parts = [x for x in out.splitlines() if x.startswith("PARTIAL ")]
            if lines:
                r = json.loads(lines[-1][7:])
            elif parts:
                r = json.loads(parts[-1][8:]) | {"cut": err.strip().splitlines()[-1] if err.strip() else "?"}
            else:
                r = {"error": (err.strip().splitlines() or ["?"])[-1]}
            if tool == "hesd" and "reference" in r:
                reference = r["reference"]
            if "top-1" in r:
                r["top-1 err"] = abs(r["top-1"] - reference) / abs(reference)
            if "error" in r:
                print(f"{size:<5} {tool:<12} failed: {r['error']} (peak RSS {r.get('RSS GiB', math.nan):.2f} GiB)")
                continue
            cells = [f"{r[c]:10.3g}" if isinstance(r.get(c), (int, float)) else f"{'-':>10}" for c in cols]
            print(f"{size:<5} {tool:<12} " + " ".join(cells), flush=True)
            if "cut" in r:
                print(f"      cut short ({r['cut']}); the columns are what it measured before")
            if tool == "hesd":
                print(f"      P = {r['P']:,}; λmax {r.get('reference', math.nan):.6g}; SLQ λmax {r['SLQ λmax']:.6g}; "
                      f"plan {r['plan GiB']:.2f} GiB vs resident growth {r['grown GiB']:.2f} GiB; peak RSS after "
                      f"the SLQ {r['SLQ RSS GiB']:.2f} GiB", flush=True)  # fmt: skip
                print("      " + r["plan"].replace("\n", "\n      "), flush=True)


if __name__ == "__main__":
    main()
