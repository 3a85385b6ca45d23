"""Tiny random-init Hugging Face models built from configs, and dict batches with uneven padding."""

from __future__ import annotations

import logging

import torch

logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 13


def tiny(family: str, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A one-layer model of ``family`` (gpt2, llama, bert-mlm, bert-cls, bert-tok, t5, gpt2-lora), seeded."""
    import transformers as tf

    torch.manual_seed(0)
    if family in ("gpt2", "gpt2-lora"):
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                 bos_token_id=1, eos_token_id=1))  # fmt: skip
        if family == "gpt2-lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
            )
            with torch.no_grad():  # LoRA's B starts at zero: move it so the adapter's Hessian is not degenerate
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.3)
    elif family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=12,
                                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                   max_position_embeddings=16, pad_token_id=0, bos_token_id=1,
                                                   eos_token_id=2))  # fmt: skip
    elif family in ("bert-mlm", "bert-cls", "bert-tok"):
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=12, max_position_embeddings=16, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, num_labels=3)  # fmt: skip
        heads = {"bert-mlm": tf.BertForMaskedLM, "bert-cls": tf.BertForSequenceClassification,
                 "bert-tok": tf.BertForTokenClassification}  # fmt: skip
        model = heads[family](cfg)
    elif family == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=12, num_layers=1,
                                                          num_decoder_layers=1, num_heads=2, dropout_rate=0.0,
                                                          decoder_start_token_id=0, pad_token_id=0))  # fmt: skip
    else:
        raise ValueError(family)
    return model.to(dtype)


def batches(family: str, seed: int = 1, sizes: tuple[int, ...] = (2, 3, 4)) -> list[dict[str, torch.Tensor]]:
    """Dict batches of unequal lengths: rows padded at the end (labels -100), some labels -100 inside."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, rows in enumerate(sizes):
        length = 5 + b
        ids = torch.randint(3, VOCAB, (rows, length), generator=g)
        mask = torch.ones(rows, length, dtype=torch.long)
        labels = ids.clone()
        for i in range(rows):
            keep = int(torch.randint(2, length + 1, (1,), generator=g))
            ids[i, keep:], mask[i, keep:], labels[i, keep:] = 0, 0, -100
            if keep > 3:
                labels[i, 2] = -100
        if family == "bert-cls":
            labels = torch.randint(0, 3, (rows,), generator=g)
        elif family == "bert-tok":
            labels = torch.randint(0, 3, (rows, length), generator=g).masked_fill(labels == -100, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out
