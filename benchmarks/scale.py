"""GPT-2 at about 10 M, 40 M and 124 M parameters: hesd beside PyHessian, curvlinops and hessian-eigenthings 1.0.

Random init from configs (vocabulary 50 257, 128 positions), one batch of 4 × 128 tokens, the
model's own loss (the peers: its shifted cross-entropy over the logits, the same loss). Each
(tool, size) runs in a fresh process, so that its peak resident memory (``ru_maxrss``) is its
own. Per run, as far as the tool can go:

* ``grad s`` — one gradient; ``HVP s`` — one product (hesd: the median of nine under the plan:
  three right after the SLQ with its operator, three before the top-1 and three after it; each
  loop is compared with the products timed beside it, so that a drift of the machine's speed
  during the run moves both sides of its ratio; each loop's products are timed one by one;
  eigenthings: its autograd product); ``FD s`` — one finite-difference product (hesd, eigenthings);
* ``top-1`` — the largest eigenvalue at tolerance 1e-3: seconds, products, and its relative
  error against hesd's reference value (hesd runs first and hands it on, or ``--reference``): the
  two largest eigenvalues by restarted Lanczos from another random start with a 16-vector basis,
  until their residual bound is ``--ref-tol`` (1e-5) of λmax, which bounds the reference's own
  error by as much (asking for two keeps a near-degenerate top pair from hiding the largest);
* ``SLQ s`` — a 30-step SLQ probe (hesd: under the memory plan for ``--max-memory``, which it
  prints; PyHessian ``density(iter=30)``; eigenthings ``spectral_density``; curvlinops has no
  per-probe Ritz weights);
* ``RSS GiB`` — peak resident memory of the process (hesd: over its measured phases; the heap
  that a phase frees is handed back before the finite-difference product and before the top-1,
  as the top-1 does itself where it maps its basis, so each phase's peak is its own); for hesd
  also the plan's estimate against the measured growth of resident memory during the analysis;
  ``GPU GiB`` (``--device cuda``) — the GPU's peak allocation over the measured phases;
* ``--float64`` — hesd also finds the top three eigenvalues of the same model in float64, the
  reference that float32 runs cannot settle (on a GPU, seconds).

The peers need SDPA's math kernel (``attn_implementation="eager"``): the fused CPU kernel
``transformers`` picks has no second derivative and no forward-mode rule.

    python benchmarks/scale.py --sizes 10M 40M 124M          # hours on 2 CPU cores
    python benchmarks/scale.py --quick                        # smoke: a 1 M model, hesd only
    python benchmarks/scale.py --device cuda --sizes 124M --max-memory free --float64   # on a GPU
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import importlib.metadata
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import torch
from torch import nn

SIZES = {"1M": (64, 2, 2, 512), "10M": (192, 4, 4, 50257), "40M": (512, 4, 8, 50257), "124M": (768, 12, 12, 50257)}
TOOLS = ("hesd", "eigenthings", "pyhessian", "curvlinops")
LENGTH, ROWS, STEPS = 128, 4, 30
DEVICE = torch.device("cpu")  # the child's device (--device); on a GPU each phase also reports the GPU's peak memory


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def _mallinfo2():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc >= 2.33
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_in_use() -> int | None:
    """Bytes glibc's ``malloc`` has handed out and not yet had back (``mallinfo2``: ``uordblks + hblkhd``).

    Resident memory above it is freed memory the allocator keeps (holes in its heap), so the two together
    tell what a phase needed from what fragmentation cost.
    """
    if _MALLINFO2 is None:
        return None
    m = _MALLINFO2()
    return m.uordblks + m.hblkhd


def build(size: str, eager: bool):
    import transformers as tf

    tf.utils.logging.set_verbosity_error()
    hidden, layers, heads, vocab = SIZES[size]
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=vocab, n_positions=LENGTH, n_embd=hidden, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    if eager:
        cfg._attn_implementation = "eager"
    model = tf.GPT2LMHeadModel(cfg).eval().to(DEVICE)
    ids = torch.randint(0, vocab, (ROWS, LENGTH), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return model, {"input_ids": ids, "labels": ids.clone()}


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


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


class _Sampler:
    """Resident memory sampled every 0.2 s in a thread: the peak within each phase, not only since the start."""

    def __init__(self) -> None:
        self.peak, self.heap_peak = current_rss(), heap_in_use() or 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def sample(self) -> None:
        self.peak = max(self.peak, current_rss())
        self.heap_peak = max(self.heap_peak, heap_in_use() or 0)

    def reset(self) -> int:
        now = current_rss()
        self.peak, self.heap_peak = now, heap_in_use() or 0
        return now


_SAMPLER: _Sampler | None = None


@contextmanager
def phase(name: str, r: dict, key: str | None = None):
    """Time one phase; print it as soon as it ends (``PHASE`` line: seconds, RSS at its start, peak, end)."""
    global _SAMPLER
    _SAMPLER = _SAMPLER or _Sampler()
    sync()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
    start, t, ru = _SAMPLER.reset(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    yield
    sync()
    secs = time.perf_counter() - t
    ru2 = resource.getrusage(resource.RUSAGE_SELF)
    _SAMPLER.sample()
    if key:
        r[key] = secs
    r.setdefault("phases", []).append(
        {"phase": name, "s": secs, "start GiB": start / 2**30, "peak GiB": _SAMPLER.peak / 2**30,
         "end GiB": current_rss() / 2**30, "user s": ru2.ru_utime - ru.ru_utime,
         "system s": ru2.ru_stime - ru.ru_stime, "page faults": ru2.ru_minflt - ru.ru_minflt,
         "heap peak GiB": _SAMPLER.heap_peak / 2**30 if _MALLINFO2 else None})  # fmt: skip
    if DEVICE.type == "cuda":
        r["phases"][-1]["GPU peak GiB"] = torch.cuda.max_memory_allocated(DEVICE) / 2**30
        r["GPU GiB"] = max(r.get("GPU GiB", 0.0), r["phases"][-1]["GPU peak GiB"])
    print("PHASE " + json.dumps(r["phases"][-1]), flush=True)
    partial(r)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def timed_operator(op):
    """``op`` counting the seconds it spends in products and in its first-order pass (``product s``, ``pass s``).

    A subclass of its own class that overrides the two hooks (:meth:`LinearOperator._matmat`, the one every
    operator implements, and :meth:`HessianOperator.prepare`); the pass that the first product starts is
    counted as a pass, not as a product.
    """

    class Timed(type(op)):
        def _matmat(self, V):
            if self.state is None:
                self.prepare()
            t = time.perf_counter()
            out = super()._matmat(V)
            sync()
            self.product_times.append(time.perf_counter() - t)
            self.product_s += self.product_times[-1]
            return out

        def prepare(self):
            t = time.perf_counter()
            super().prepare()
            sync()
            self.pass_s += time.perf_counter() - t

    op.__class__, op.product_s, op.pass_s, op.product_times = Timed, 0.0, 0.0, []
    return op


def three_products(op, v: torch.Tensor, name: str, r: dict) -> list[float]:
    """Three products ``op @ v`` in a phase of their own; their seconds, one by one (:func:`timed_operator`)."""
    k0 = len(op.product_times)
    with phase(name, r):
        for _ in range(3):
            op @ v
    return op.product_times[k0:]


def run_hesd(size: str, a) -> dict:
    import hesd
    from hesd.allocator import release_free_memory
    from hesd.analysis.memory_plan import plan_memory

    model, batch = build(size, eager=False)
    data = [batch]
    r: dict = {"P": sum(p.numel() for p in model.parameters())}
    before = current_rss()  # the planned analysis first, so that the process's peak is its own
    with phase("plan", r):
        plan = plan_memory(model, None, data, num_steps=STEPS, max_memory=a.max_memory)
    r["plan"], r["plan GiB"] = plan.describe(), plan.total / 2**30
    print("PLAN " + json.dumps(r["plan"]), flush=True)
    if not a.skip_slq:
        op = timed_operator(hesd.HessianOperator(model, None, data, **plan.operator_kwargs()))
        with phase("SLQ", r, "SLQ s"):
            spec = hesd.slq(op, STEPS, 1, seed=0, **plan.slq_kwargs())
        r["SLQ HVPs"], r["SLQ products s"], r["SLQ pass s"] = op.num_matvecs, op.product_s, op.pass_s
        r["SLQ product times"] = list(op.product_times)
        r["SLQ λmax"] = float(max(spec.values[0]))
        r["grown GiB"] = (rss_gib() * 2**30 - before) / 2**30
        r["SLQ RSS GiB"] = rss_gib()
        del spec
        v = torch.randn(op.shape[0], device=DEVICE)  # one product beside the SLQ: its operator, its kept graphs
        r["HVP times after the SLQ"] = three_products(op, v, "products (3) after the SLQ", r)
        del op, v
    params = list(model.parameters())
    with phase("gradient", r, "grad s"):
        torch.autograd.grad(model(**batch).loss, params)
    op = timed_operator(hesd.HessianOperator(model, None, data, **plan.operator_kwargs()))  # the plan's memory
    v = torch.randn(op.shape[0], device=DEVICE)
    with phase("first product", r):
        op @ v  # first-order pass (graphs kept as the plan allows)
    r["HVP times"] = three_products(op, v, "products (3)", r)  # (one sample varied by 11 % between runs)
    r["HVP s"] = statistics.median(r["HVP times"])
    release_free_memory()  # the products' freed buffers: not resident through the next phases (untimed here)
    fd = hesd.HessianOperator(model, None, data, hvp_method="finite_difference", check_deterministic=False)
    fd @ v
    with phase("finite-difference product", r, "FD s"):
        fd @ v
    del fd, v
    n0, p0, t0 = op.num_matvecs, op.product_s, len(op.product_times)
    kw = plan.extremes_kwargs()  # a window where the SLQ's is one, else a restart basis within its memory
    r["eigen basis"] = "window of 3" if kw.get("reorth") == "window" else f"restart basis {kw['max_basis']}"
    # What the finite-difference phase freed, handed back before the top-1 starts, as the top-1 does itself where it
    # maps its basis (hesd.allocator.basis_buffer): its peak is then its own, not the retained heap of that phase.
    release_free_memory()
    with phase("top-1", r, "top-1 s"):
        top = hesd.eigenvalues(op, k=1, tol=1e-3, warn=False, **kw)
    r["top-1 HVPs"], r["top-1"] = op.num_matvecs - n0, float(top.eigenvalues[0])
    r["top-1 products s"], r["top-1 product times"] = op.product_s - p0, op.product_times[t0:]
    v = torch.randn(op.shape[0], device=DEVICE)  # the other side of the top-1: drift of the machine's speed
    r["HVP times after"] = three_products(op, v, "products (3) after the top-1", r)
    r["one product beside the top-1"] = statistics.median(r["HVP times"] + r["HVP times after"])
    r["HVP s"] = statistics.median(r["HVP times"] + r["HVP times after"] + r.get("HVP times after the SLQ", []))
    del v
    if a.reference is not None:  # given: not recomputed
        return float64_reference(model, batch, r, a) | {
            "reference": a.reference,
            "RSS GiB (measured phases)": max(p["peak GiB"] for p in r["phases"]),
        }
    del top
    n0 = op.num_matvecs
    r["RSS GiB (measured phases)"] = max(p["peak GiB"] for p in r["phases"])
    # The reference: the two largest eigenvalues from another random start with a larger basis (outside the
    # plan: not part of the row's memory), so that a near-degenerate top pair cannot hide the largest one.
    with phase(f"reference (top 2, tol {a.ref_tol:g})", r):
        ref = hesd.eigenvalues(op, k=2, tol=a.ref_tol, warn=False, max_basis=16, seed=1, max_matvecs=150)
    r["reference"], r["reference HVPs"] = float(ref.eigenvalues[0]), op.num_matvecs - n0
    r["reference second"], r["reference converged"] = float(ref.eigenvalues[1]), bool(ref.converged)
    return float64_reference(model, batch, r, a)


def float64_reference(model, batch: dict, r: dict, a) -> dict:
    """``--float64``: the top three eigenvalues of the same model and batch in float64 (restarted Lanczos, a
    40-vector basis, tolerance 1e-9), which settles λmax where float32 runs disagree (outside the plan and the row)."""
    if not a.float64:
        return r
    import hesd

    op = hesd.HessianOperator(model.double(), None, [batch])
    try:
        with phase("float64 reference (top 3, tol 1e-9)", r):
            ref = hesd.eigenvalues(op, k=3, tol=1e-9, warn=False, max_basis=40, seed=2, max_matvecs=600)
    except Exception as exc:  # keep the float32 row
        r["float64 error"] = f"{type(exc).__name__}: {exc}"[:300]
        return r
    r["float64 top 3"], r["float64 converged"] = ref.eigenvalues.tolist(), bool(ref.converged)
    r["float64 HVPs"] = op.num_matvecs
    print(
        "FLOAT64 " + json.dumps({k: r[k] for k in ("float64 top 3", "float64 converged", "float64 HVPs")}), flush=True
    )
    return r


def child(tool: str, size: str, a) -> None:
    global DEVICE
    torch.set_num_threads(a.threads)
    DEVICE = torch.device(a.device)
    sys.modules.setdefault("scale", sys.modules[__name__])  # the peers' module shares this one's globals
    from scale_peers import run_curvlinops, run_eigenthings, run_pyhessian

    try:
        r = {"hesd": run_hesd, "eigenthings": run_eigenthings, "pyhessian": run_pyhessian,
             "curvlinops": run_curvlinops}[tool](size, a)  # fmt: skip
    except Exception as exc:  # a tool that cannot run here: say why
        r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
    r["RSS GiB"] = rss_gib()
    print("RESULT " + json.dumps(r))


def run_child(cmd: list[str], tool: str, size: str, timeout: float, env=None) -> tuple[str, str]:
    """Run one (tool, size) child; print each phase as it ends; stop it after ``timeout`` seconds."""
    with tempfile.TemporaryFile("w+") as errf:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, text=True, env=env)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        lines = []
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line)
            if line.startswith("PHASE "):
                ph = json.loads(line[6:])
                print(f"      {tool} {size} · {ph['phase']}: {ph['s']:.1f} s (CPU: user {ph['user s']:.0f} s, system "
                      f"{ph['system s']:.0f} s, {ph['page faults'] / 1e6:.2f} M page faults); resident "
                      f"{ph['start GiB']:.2f} → peak {ph['peak GiB']:.2f} → {ph['end GiB']:.2f} GiB"
                      + (f"; malloc'd peak {ph['heap peak GiB']:.2f} GiB" if ph.get("heap peak GiB") else "")
                      + (f"; GPU peak {ph['GPU peak GiB']:.2f} GiB" if "GPU peak GiB" in ph else ""),
                      flush=True)  # fmt: skip
            elif line.startswith("PLAN "):
                print("      " + json.loads(line[5:]).replace("\n", "\n      "), flush=True)
        p.wait()
        timer.cancel()
        errf.seek(0)
        err = errf.read()
        if p.returncode == -9 and not any(x.startswith("RESULT ") for x in lines):
            err += f"\ndid not finish in {timeout} s"
    return "".join(lines), err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["10M", "40M", "124M"], choices=list(SIZES))
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--max-memory", type=lambda s: None if s == "free" else int(float(s) * 2**30), default=10 * 2**30,
                    help="GiB for hesd's plan, or 'free' (what the device has free)")  # fmt: skip
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--float64", action="store_true", help="hesd also finds the top 3 eigenvalues in float64")
    ap.add_argument("--timeout", type=int, default=3 * 3600, help="seconds per (tool, size) run")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--ref-tol", type=float, default=1e-5, help="tolerance of hesd's reference λmax")
    ap.add_argument("--reference", type=float, default=None,
                    help="λmax to score the top-1 errors against (hesd's reference from an earlier run of the same "
                         "size and seed), instead of computing it: one size at a time")  # fmt: skip
    ap.add_argument("--tune-allocator", nargs="?", const="reuse", choices=("reuse", "cli"),
                    help="every tool's process with glibc malloc tuned (hesd.allocator.environment): 'reuse' (the "
                         "default) reuses large buffers between products in every process; 'cli' does what "
                         "`hesd analyze` does: hesd reuses them only without a memory budget (--max-memory free), "
                         "the peers always")  # fmt: skip
    ap.add_argument("--skip-slq", action="store_true",
                    help="hesd without its SLQ: the plan, the products, then the top-1 in a process of its own (as a "
                         "script that wants only λmax runs it)")  # fmt: skip
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a)
        return
    if a.quick:
        a.sizes, a.tools, a.max_memory = ["1M"], ["hesd"], 2**30
    if a.tune_allocator:  # inherited by every child, whichever tool it runs
        from hesd.allocator import environment

        os.environ.update(environment())
        under_budget = environment(reuse_large=False)  # `hesd analyze --max-memory`
    budget = "free" if a.max_memory is None else f"{a.max_memory / 2**30:.1f} GiB"
    gpu = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "no GPU"
    from hesd.algorithms import fused

    step = "in PyTorch calls"
    if fused.AVAILABLE and fused.ENABLED:
        step = f"compiled (Numba {importlib.metadata.version('numba')})"
    print(f"torch {torch.__version__}, {a.threads} threads, device {a.device} ({gpu}); GPT-2, {ROWS} x {LENGTH} "
          f"tokens, own loss; hesd --max-memory {budget}; hesd's float32 CPU Lanczos step {step}"
          + {None: "", "reuse": "; glibc malloc tuned for every tool (large buffers reused)",
             "cli": "; glibc malloc tuned as hesd analyze does (hesd reuses large buffers only without a budget)"}[
                a.tune_allocator], flush=True)  # fmt: skip
    cols = ["grad s", "HVP s", "FD s", "top-1 s", "top-1 HVPs", "top-1 err", "SLQ s", "RSS GiB"]
    cols += ["GPU GiB"] if a.device.startswith("cuda") else []
    print(f"{'size':<5} {'tool':<12} " + " ".join(f"{c:>10}" for c in cols), flush=True)
    for size in a.sizes:
        reference = a.reference if a.reference is not None else math.nan
        for tool in a.tools:
            budget = "free" if a.max_memory is None else str(a.max_memory / 2**30)
            cmd = [sys.executable, __file__, "--child", tool, size, "--max-memory", budget, "--device", a.device,
                   "--threads", str(a.threads), "--ref-tol", str(a.ref_tol)] + ["--float64"] * a.float64  # fmt: skip
            cmd += ["--skip-slq"] * a.skip_slq
            cmd += ["--reference", str(a.reference)] if a.reference is not None else []
            env = None
            if a.tune_allocator == "cli" and tool == "hesd" and a.max_memory is not None:
                env = os.environ | under_budget
            out, err = run_child(cmd, tool, size, a.timeout, env)
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
            if "top-1" in r:
                print(f"      top-1 λ = {r['top-1']:.7g}", flush=True)
            if "float64 top 3" in r or "float64 error" in r:
                print(f"      float64: top 3 {r.get('float64 top 3')} (converged {r.get('float64 converged')}, "
                      f"{r.get('float64 HVPs')} products) {r.get('float64 error', '')}", flush=True)  # fmt: skip
            if "cut" in r:
                print(f"      cut short ({r['cut']}); the columns are what it measured before")
            if tool == "hesd":
                g = {
                    k: r.get(k, math.nan)
                    for k in ("P", "reference", "SLQ λmax", "plan GiB", "grown GiB", "SLQ RSS GiB")
                }.get  # a run cut short lacks the later keys
                print(f"      P = {g('P'):,}; λmax {g('reference'):.6g}; SLQ λmax {g('SLQ λmax'):.6g}; "
                      f"plan {g('plan GiB'):.2f} GiB vs resident growth {g('grown GiB'):.2f} GiB; peak RSS after "
                      f"the SLQ {g('SLQ RSS GiB'):.2f} GiB", flush=True)  # fmt: skip
                print(f"      reference: top two {g('reference'):.7g}, {r.get('reference second', math.nan):.7g} "
                      f"(converged {r.get('reference converged')}, {r.get('reference HVPs')} products); peak RSS over "
                      f"the measured phases (the reference's larger basis excluded) "
                      f"{r.get('RSS GiB (measured phases)', math.nan):.2f} GiB", flush=True)  # fmt: skip
                after_slq = r.get("HVP times after the SLQ")
                one_slq = statistics.median(after_slq) if after_slq else math.nan
                one_top = r.get("one product beside the top-1", math.nan)
                print(f"      wall time against products × one product timed beside the loop: SLQ "
                      f"{r.get('SLQ s', math.nan) / (r.get('SLQ HVPs', math.nan) * one_slq):.3f} "
                      f"({r.get('SLQ HVPs', '?')} products × {one_slq:.3g} s, the median of 3 right after it), top-1 "
                      f"{r.get('top-1 s', math.nan) / (r.get('top-1 HVPs', math.nan) * one_top):.3f} "
                      f"({r.get('top-1 HVPs', '?')} products × {one_top:.3g} s, the median of 3 before and 3 after it; "
                      f"{r.get('eigen basis', '?')})", flush=True)  # fmt: skip
                spread = ", ".join(
                    f"{name} {statistics.median(ts):.2f} (first {ts[0]:.2f}, min {min(ts):.2f}, max {max(ts):.2f})"
                    for name, key in (("in the SLQ", "SLQ product times"), ("in the top-1", "top-1 product times"))
                    if (ts := r.get(key))
                )  # fmt: skip
                alone = " | ".join(
                    ", ".join(f"{t:.2f}" for t in r.get(k, []))
                    for k in ("HVP times after the SLQ", "HVP times", "HVP times after")
                )
                print(f"      product seconds: alone {alone} (after the SLQ | before | after the top-1); "
                      f"median {spread}", flush=True)  # fmt: skip
                slq, top1 = r.get("SLQ s", math.nan), r.get("top-1 s", math.nan)
                sp, sh, tp = (r.get(k, math.nan) for k in ("SLQ pass s", "SLQ products s", "top-1 products s"))
                print(f"      inside: SLQ {slq:.1f} s = first-order pass {sp:.1f} + products {sh:.1f} + the rest "
                      f"{slq - sp - sh:.1f}; top-1 {top1:.1f} s = products {tp:.1f} + the rest {top1 - tp:.1f}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
