"""``hesd demo --lm``: a tiny character-level GPT trained with the ``Trainer``, analysed as a user would.

Runs offline with what every Python install has: the text is the source of modules of Python's
own standard library (training: ``textwrap``, ``string``, ``base64``, ``shlex``; held out:
``fnmatch``, ``glob``), tokenised byte by byte (a byte-level tokenizer with no merges: one token
per character of ASCII text). A 2-layer GPT-2 (random init from a config) is trained with
``transformers``' ``Trainer``, which saves ``checkpoint-*`` folders with the tokenizer; then
exactly what a user types runs —

    hesd analyze OUT/trainer/checkpoint-* --data OUT/train.txt --heldout OUT/heldout.txt --out OUT/results

— reading each folder's config, weights, tokenizer and ``trainer_state.json``, taking the
Hessian of the model's own token-level loss, and writing the table and ``report.html``. Needs
``pip install 'hesd[transformers]'``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from ..analysis.hf_checkpoints import require
from ..errors import HesdPermissionError

__all__ = ["HELDOUT_MODULES", "TRAIN_MODULES", "byte_tokenizer", "run_lm_demo", "stdlib_text"]

TRAIN_MODULES = ("textwrap", "string", "base64", "shlex")
HELDOUT_MODULES = ("fnmatch", "glob")


def stdlib_text(modules: tuple[str, ...]) -> str:
    """The source text of standard-library modules, read from the running Python's own files."""
    root = Path(os.__file__).parent
    parts = []
    for name in modules:
        path = root / f"{name}.py"
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)


def byte_tokenizer() -> Any:
    """A byte-level tokenizer without merges (``<pad>`` = 0, ``<eos>`` = 1, then the 256 bytes)."""
    require("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=258, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<pad>", "<eos>"], show_progress=False)  # fmt: skip
    tok.train_from_iterator(["a"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: list[int], length: int) -> None:
        self.rows = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = torch.tensor(self.rows[i], dtype=torch.long)
        return {"input_ids": row, "labels": row}


def train_tiny_gpt(out: Path, *, steps: int, save_steps: int, length: int = 64, seed: int = 0,
                   callbacks: list[Any] | None = None) -> Path:  # fmt: skip
    """Train the demo's GPT with the ``Trainer``; return its output folder (``checkpoint-*`` inside)."""
    transformers = require("transformers")
    tokenizer = byte_tokenizer()
    text = stdlib_text(TRAIN_MODULES)
    (out / "train.txt").write_text(text, encoding="utf-8")
    (out / "heldout.txt").write_text(stdlib_text(HELDOUT_MODULES), encoding="utf-8")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=length, n_embd=48, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=1)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=16, learning_rate=3e-3,
        lr_scheduler_type="constant", warmup_steps=0, save_steps=save_steps, save_strategy="steps",
        logging_steps=save_steps, report_to=[], use_cpu=True, seed=seed, dataloader_num_workers=0,
        disable_tqdm=True, save_only_model=False, log_level="error",
    )  # fmt: skip
    data = _Blocks(tokenizer(text)["input_ids"], length)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                   callbacks=callbacks)  # fmt: skip
    trainer.remove_callback(transformers.PrinterCallback)  # no log dict per 100 steps
    trainer.train()
    return out / "trainer"


def run_lm_demo(out: str | Path = "hesd-demo-lm", *, quick: bool = False, quiet: bool = False) -> dict:
    """Train, then run ``hesd analyze`` on the ``Trainer``'s checkpoints; return the selections and paths."""
    t0 = time.perf_counter()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HesdPermissionError(f"hesd demo: cannot create {out} ({exc.strerror}); pass --out") from None
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    require("transformers").utils.logging.disable_progress_bar()
    steps, every = (120, 40) if quick else (600, 100)
    if not quiet:
        print(f"training a 2-layer character-level GPT-2 with the Trainer for {steps} steps on standard-library "
              f"source text, a checkpoint every {every} steps")  # fmt: skip
    trainer_dir = train_tiny_gpt(out, steps=steps, save_steps=every)
    from .cli import analyze

    checkpoints = sorted(str(p) for p in trainer_dir.glob("checkpoint-*"))
    command = (f"hesd analyze {trainer_dir}/checkpoint-* --data {out}/train.txt --heldout {out}/heldout.txt "
               f"--max-samples 16 --out {out}/results")  # fmt: skip
    if not quiet:
        print(f"\n$ {command}")
    import typer

    try:
        analyze(checkpoints, data=str(out / "train.txt"), heldout=str(out / "heldout.txt"), out=out / "results",
                max_samples=16, steps=20 if quick else 30, probes=2, quiet=quiet, max_length=64,
                landscape=not quick)  # fmt: skip
    except typer.Exit as done:
        if done.exit_code not in (0, None):
            raise
    import json

    selections = json.loads((out / "results" / "selection.json").read_text())
    result = {"selections": selections, "report": str((out / "results" / "report.html").resolve()),
              "command": command, "seconds": time.perf_counter() - t0}  # fmt: skip
    if not quiet:
        print(f"({result['seconds']:.0f} s in all)")
    return result
