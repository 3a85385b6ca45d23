"""A full HESD of GPT-2 small (124 M parameters) on one device: 80 Lanczos steps × 4 probes over 65 536 tokens.

The model is GPT-2 small's configuration (768 wide, 12 layers, 12 heads, vocabulary 50 257; 128
positions, as in ``benchmarks/scale.py``) with random weights, the data 512 × 128 random tokens
in batches of ``--rows`` rows, the loss the model's own (the mean over every label token of all
batches). hesd plans the memory (``--max-memory``, default what the device has free), prints the
plan, times one product, runs the SLQ with a line every 20 steps, and prints the criteria (λmin,
λmax, re, KH05, Ct, type) with the wall time of each part.

Precision (``--precision``): ``fp32`` full float32 products; ``tf32`` lets float32 matrix products
round to TensorFloat-32 (``allow_tf32=True``; hesd's default is full precision); ``bf16`` runs
forward passes under bfloat16 autocast (``autocast_dtype``). For ``tf32`` and ``bf16`` one product
is repeated in full float32 on the same vector and the relative difference printed.

    python benchmarks/gpt2_hesd.py --device cuda                       # the issue's target: under 10 minutes
    python benchmarks/gpt2_hesd.py --tokens 2048 --steps 10 --probes 2 --size 1M   # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(size: str, tokens: int, length: int, rows: int, device: torch.device):
    from scale import SIZES

    import transformers as tf

    tf.utils.logging.set_verbosity_error()
    hidden, layers, heads, vocab = SIZES[size]
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=vocab, n_positions=length, n_embd=hidden, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = tf.GPT2LMHeadModel(cfg).eval().to(device)
    ids = torch.randint(0, vocab, (tokens // length, length), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": b.to(device), "labels": b.to(device)} for b in ids.split(rows)]
    return model, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="124M", help="a size of benchmarks/scale.py (124M: GPT-2 small)")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--rows", type=int, default=64, help="rows (sequences) per batch")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="tf32")
    ap.add_argument("--max-memory", default="free", help="GiB for the plan, or 'free'")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()

    import hesd
    from hesd.analysis.memory_plan import plan_memory

    device = torch.device(a.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t_all = time.perf_counter()
    model, data = build(a.size, a.tokens, a.length, a.rows, device)
    n_tokens = sum(int(b["labels"][:, 1:].numel()) for b in data)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    P = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__} on {name}; GPT-2 {a.size} ({P:,} parameters); {len(data)} batches of "
          f"{a.rows} x {a.length} tokens ({n_tokens:,} label tokens); {a.steps} steps x {a.probes} probes; "
          f"precision {a.precision}", flush=True)  # fmt: skip
    r: dict = {"parameters": P, "label tokens": n_tokens, "steps": a.steps, "probes": a.probes,
               "precision": a.precision, "device": name, "torch": torch.__version__}  # fmt: skip
    budget = None if a.max_memory == "free" else int(float(a.max_memory) * 2**30)
    t = time.perf_counter()
    autocast = torch.bfloat16 if a.precision == "bf16" else None  # measured so by the plan (half-size graphs)
    plan = plan_memory(model, None, data, num_steps=a.steps, max_memory=budget, autocast_dtype=autocast)
    r["plan s"], r["plan"] = time.perf_counter() - t, plan.describe()
    print(f"plan ({r['plan s']:.1f} s):\n{plan.describe()}", flush=True)
    kwargs = plan.operator_kwargs() | {"allow_tf32": a.precision == "tf32", "autocast_dtype": autocast}
    op = hesd.HessianOperator(model, None, data, **kwargs)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(2)).to(device)
    for key in ("first product s", "product s"):
        sync()
        t = time.perf_counter()
        Hv = op @ v
        sync()
        r[key] = time.perf_counter() - t
    print(f"first product {r['first product s']:.2f} s, one product {r['product s']:.2f} s", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n0, start = op.num_matvecs, time.perf_counter()

    def progress(probe: int, step: int) -> None:
        if (step + 1) % 20 == 0:
            print(f"  probe {probe + 1}/{a.probes}, step {step + 1}/{a.steps}: {time.perf_counter() - start:.1f} s",
                  flush=True)  # fmt: skip

    spec = hesd.slq(op, a.steps, a.probes, seed=0, callback=progress, **plan.slq_kwargs())
    sync()
    r["SLQ s"], r["SLQ products"] = time.perf_counter() - start, op.num_matvecs - n0
    if device.type == "cuda":
        r["GPU peak GiB (SLQ)"] = torch.cuda.max_memory_allocated(device) / 2**30
    if a.precision != "fp32":  # the same product in full float32 (after the SLQ: its kept graphs freed first)
        del op
        exact = hesd.HessianOperator(model, None, data, **(kwargs | {"allow_tf32": False, "autocast_dtype": None}))
        ref = exact @ v
        r[f"{a.precision} product error"] = float((Hv - ref).norm() / ref.norm())
        print(f"{a.precision} product against full float32: relative difference "
              f"{r[f'{a.precision} product error']:.2e}", flush=True)  # fmt: skip
        del exact, ref
    c = hesd.criteria(spec)
    lo = min(float(x.min()) for x in spec.values)
    hi = max(float(x.max()) for x in spec.values)
    r |= {"lambda_min": lo, "lambda_max": hi, "re": c.re, "kh05": c.kh05, "ct": c.ct, "type": c.hesd_type}
    r["total s"] = time.perf_counter() - t_all
    print(f"SLQ: {r['SLQ s']:.1f} s for {r['SLQ products']} products ({r['SLQ s'] / r['SLQ products']:.2f} s "
          f"each, {r['SLQ s'] / (r['SLQ products'] * r['product s']):.3f} x one product)", flush=True)  # fmt: skip
    print(f"λmin {lo:.5g}, λmax {hi:.5g}, re {c.re:.4g}, KH05 {c.kh05:.4g}, Ct {c.ct:.4g}, type {c.hesd_type}; "
          f"total {r['total s']:.1f} s (model, plan, products, SLQ)", flush=True)  # fmt: skip
    if "GPU peak GiB (SLQ)" in r:
        print(f"GPU peak memory during the SLQ {r['GPU peak GiB (SLQ)']:.2f} GiB", flush=True)
    print("RESULT " + json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
