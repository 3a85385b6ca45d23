"""Transformer families as Hugging Face builds them: one product, one checkpoint, measured in one run.

Families: GPT-2, a Llama-style model (RMSNorm, rotary embeddings, grouped-query attention,
``padding_idx``), BERT masked-LM, BERT sequence classification and GPT-2 with a LoRA adapter
(peft; the Hessian over the adapter). Random init from configs (hidden 64, 2 layers, 4 heads,
vocabulary 512), float32, ``n_batches`` dict batches of 8 rows × 64 tokens with uneven padding,
each model's own loss (``loss_fn=None``). Per family, in the same run:

* one gradient of the loss over all the data;
* one hesd product (``hvp_method="auto"``: first-order graphs kept) and its ratio to the gradient;
* the product as PyHessian computes it over several batches — double backward recomputed per
  batch, batches weighted equally (biased when token counts differ) — hand-written here, since
  PyHessian and curvlinops fail on these models as ``transformers`` builds them (SDPA's fused
  CPU kernel has no second derivative); run on SDPA's math kernel;
* the products and seconds :func:`hesd.analyze_model` spends on one checkpoint with the default
  settings (80-step SLQ × 3 probes, certified λmin/λmax).

    python benchmarks/transformer_families.py            # full (a few minutes on 2 CPU cores)
    python benchmarks/transformer_families.py --quick    # smoke
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import hesd

logging.getLogger("transformers").setLevel(logging.ERROR)
FAMILIES = ("gpt2", "llama", "bert-mlm", "bert-cls", "gpt2-lora")
VOCAB, HIDDEN, LAYERS, HEADS, LENGTH = 512, 64, 2, 4, 64


def build(family: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if family.startswith("gpt2"):
        config = tf.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        model = tf.GPT2LMHeadModel(config)
        if family == "gpt2-lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.02)
        return model
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                                                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                  num_key_value_heads=2, max_position_embeddings=LENGTH,
                                                  pad_token_id=0))  # fmt: skip
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=4 * HIDDEN, max_position_embeddings=LENGTH, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=4)  # fmt: skip
    return tf.BertForMaskedLM(cfg) if family == "bert-mlm" else tf.BertForSequenceClassification(cfg)


def batches(family: str, n_batches: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, VOCAB, (8, LENGTH), generator=g)
        lengths = torch.randint(LENGTH // 4, LENGTH + 1, (8,), generator=g)
        mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
        labels = ids.masked_fill(mask == 0, -100)
        if family == "bert-mlm":
            labels = labels.masked_fill(torch.rand(ids.shape, generator=g) > 0.15, -100)
        if family == "bert-cls":
            labels = torch.randint(0, 4, (8,), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def naive_product(model, data, params, v_parts):
    """PyHessian's data-loader product: per batch, double backward, equal batch weights."""
    out = [torch.zeros_like(p) for p in params]
    with sdpa_kernel(SDPBackend.MATH):
        for b in data:
            loss = model(**b).loss
            g = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v_parts, strict=True)), params)
            for o, h in zip(out, hv, strict=True):
                o += h / len(data)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", type=int, default=4)
    a = ap.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # peft's call, not ours
    n_batches = 2 if a.quick else a.batches
    repeats = 2 if a.quick else 5
    settings = hesd.AnalysisSettings(num_steps=10, num_probes=1) if a.quick else hesd.AnalysisSettings()
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; float32; "
          f"{n_batches} batches of 8 × {LENGTH} tokens; hidden {HIDDEN}, {LAYERS} layers, "
          f"vocabulary {VOCAB}")  # fmt: skip
    print(f"{'family':<10} {'P':>8} {'tokens':>6} {'grad s':>8} {'HVP s':>8} {'HVP/grad':>8} "
          f"{'naive s':>8} {'naive/hesd':>10} {'HVPs/ckpt':>9} {'ckpt s':>7}")  # fmt: skip
    for family in FAMILIES:
        model = build(family).eval()
        data = batches(family, n_batches)
        H = hesd.HessianOperator(model, None, data)
        params = H.layout.params
        v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(2))
        v_parts = H.layout.unflatten(v)

        def gradient(model=model, data=data, params=params):
            with sdpa_kernel(SDPBackend.MATH):
                total = sum(model(**b).loss for b in data)
                torch.autograd.grad(total, params)

        t_grad = timed(gradient, repeats)
        H.prepare()
        t_hvp = timed(lambda H=H, v=v: H @ v, repeats)
        t_naive = timed(lambda m=model, d=data, p=params, vp=v_parts: naive_product(m, d, p, vp), repeats)
        t0 = time.perf_counter()
        row, _ = hesd.analyze_model(model, data, loss_fn=None, settings=settings)
        t_ckpt = time.perf_counter() - t0
        print(f"{family:<10} {H.shape[0]:>8} {H.num_samples:>6} {t_grad:>8.4f} {t_hvp:>8.4f} "
              f"{t_hvp / t_grad:>8.2f} {t_naive:>8.4f} {t_naive / t_hvp:>10.2f} {row['hvps']:>9} "
              f"{t_ckpt:>7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
