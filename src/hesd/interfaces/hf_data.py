"""Text files and ``datasets`` folders as dict batches for language models, tokenised by the checkpoint's tokenizer.

``hesd analyze --data`` (and ``--heldout``) take, besides ``MODULE:FN``:

* a ``.txt`` file: the whole text tokenised and cut into blocks of ``max_length`` tokens (as
  ``transformers``' ``run_clm`` example groups texts);
* a ``.jsonl`` file: one sample per line, the ``text_field`` of each record, truncated to
  ``max_length``;
* a folder written by ``datasets``' ``save_to_disk``: its ``text_field`` column, or, when it is
  already tokenised, its ``input_ids`` (and ``attention_mask``, ``labels``) columns.

Samples become ``{input_ids, attention_mask, labels}`` batches of ``batch_size``, padded to the
longest sample of the batch; padding has ``attention_mask`` 0 and label ``-100`` (no loss).
Labels are what the head trains on: for a causal LM the tokens themselves (the model shifts
them); for a masked LM a fixed, seeded 15 % of the tokens replaced by the mask token, the
others ``-100`` (deterministic, so every product sees the same loss); for other heads the
record's ``label_field``. The first ``max_samples`` samples are used, in file order.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..analysis.checkpoints import CheckpointInfo
from ..analysis.hf_checkpoints import adapter_base, hf_checkpoint_kind, require
from ..errors import HesdValueError
from ..operators.data import as_reiterable
from ._common import call_factory, load_object

__all__ = [
    "TEXT_SUFFIXES",
    "hf_folders",
    "is_text_data",
    "lm_batches",
    "load_batches",
    "load_tokenizer",
    "read_samples",
    "text_batches",
]

TEXT_SUFFIXES = (".txt", ".jsonl")

logger = logging.getLogger("hesd")


def is_text_data(spec: str) -> bool:
    """Whether ``--data`` names a text file or a ``datasets`` folder rather than ``MODULE:FN``."""
    p = Path(spec)
    saved = ("dataset_info.json", "state.json", "dataset_dict.json")
    return p.suffix in TEXT_SUFFIXES or (p.is_dir() and any((p / f).is_file() for f in saved))


def load_tokenizer(sources: list[str | Path]) -> Any:
    """The tokenizer saved in the first of ``sources`` (checkpoint, adapter or base folders) that has one."""
    transformers = require("transformers")
    tried = []
    for src in sources:
        p = Path(src)
        if not p.is_dir():
            continue
        if any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")):
            return transformers.AutoTokenizer.from_pretrained(str(p))
        tried.append(str(p))
    raise HesdValueError(
        f"no tokenizer found in {tried or sources}: pass --tokenizer FOLDER (one saved with "
        "tokenizer.save_pretrained), or train with Trainer(processing_class=tokenizer) so each checkpoint holds it"
    )


def read_samples(spec: str | Path, text_field: str = "text", label_field: str = "label") -> tuple[list[Any], list[Any]]:
    """``(samples, labels)`` of a ``.txt``/``.jsonl`` file or ``datasets`` folder (``.txt``: one text)."""
    p = Path(spec)
    if not p.exists():
        raise HesdValueError(f"--data: {p} does not exist")
    if p.suffix == ".txt":
        return [p.read_text(encoding="utf-8", errors="replace")], []
    if p.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise HesdValueError(f"{p}:{i}: not a JSON line ({exc})") from None
    else:
        datasets = require("datasets")
        data = datasets.load_from_disk(str(p))
        if isinstance(data, datasets.DatasetDict):
            split = "train" if "train" in data else next(iter(data))
            data = data[split]
        rows = list(data)
    if rows and "input_ids" in rows[0]:
        return rows, [r.get(label_field) for r in rows] if label_field in rows[0] else []
    missing = [i for i, r in enumerate(rows) if not isinstance(r.get(text_field), str)]
    if missing or not rows:
        raise HesdValueError(
            f"{p}: record {missing[0] if missing else 0} has no text field {text_field!r}"
            + (f" (fields: {sorted(rows[missing[0]])})" if missing else " (no records)")
            + "; pass --text-field NAME"
        )
    labels = [r.get(label_field) for r in rows] if label_field in rows[0] else []
    return [r[text_field] for r in rows], labels


def lm_batches(
    tokenizer: Any, samples: list[Any], *, head: str = "causal", max_length: int = 128, batch_size: int = 8,
    max_samples: int | None = None, labels: list[Any] | None = None, group: bool = False, seed: int = 0,
) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """Dict batches for ``head`` (``"causal"``, ``"masked"`` or ``"classification"``); module docs.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        samples: texts, or records with ``input_ids`` (already tokenised).
        head: what the labels are.
        max_length: tokens per sample (truncation, or the block length with ``group``).
        batch_size: samples per batch.
        max_samples: use only the first this many samples.
        labels: per-sample labels, for ``"classification"``.
        group: concatenate the texts and cut them into blocks of ``max_length`` tokens.
        seed: the masked-LM mask's seed.

    Examples:
        >>> from hesd.interfaces.hf_data import lm_batches
        >>> class Chars:  # a stand-in tokenizer: one id per character
        ...     pad_token_id, eos_token_id, mask_token_id = 0, None, None
        ...     def __call__(self, texts, **kw):
        ...         return {"input_ids": [[ord(c) % 50 + 1 for c in t][: kw.get("max_length")] for t in texts]}
        >>> b = lm_batches(Chars(), ["hello", "hi"], max_length=8)
        >>> b[0]["labels"].tolist()
        [[5, 2, 9, 9, 12], [5, 6, -100, -100, -100]]
    """
    if head not in ("causal", "masked", "classification"):
        raise HesdValueError(f"lm_batches: head must be 'causal', 'masked' or 'classification', got {head!r}")
    if samples and isinstance(samples[0], dict):
        ids = [list(r["input_ids"]) for r in samples]
        given = [r.get("labels") for r in samples]
    else:
        texts = [str(t) for t in samples]
        if group:
            flat = [t for row in tokenizer(texts)["input_ids"] for t in row]
            ids = [flat[i : i + max_length] for i in range(0, len(flat), max_length)]
        else:
            ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        given = [None] * len(ids)
    ids = [row for row in ids if len(row) > 0]
    if max_samples is not None:
        ids, given = ids[:max_samples], given[:max_samples]
    if not ids:
        raise HesdValueError("lm_batches: the data holds no tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        if head == "classification":
            lab = (labels or [])[start : start + batch_size]
            if len(lab) != len(rows) or any(v is None for v in lab):
                raise HesdValueError("lm_batches: a classification head needs a label per sample (--label-field)")
            target = torch.tensor(lab)
        elif given[start] is not None:
            target = torch.full((len(rows), width), -100, dtype=torch.long)
            for i, r in enumerate(given[start : start + batch_size]):
                target[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        else:
            target = input_ids.masked_fill(mask == 0, -100)
            if head == "masked":
                if tokenizer.mask_token_id is None:
                    raise HesdValueError("lm_batches: a masked LM needs a tokenizer with a mask token")
                chosen = (torch.rand(input_ids.shape, generator=gen) < 0.15) & (mask == 1)
                target = target.masked_fill(~chosen, -100)
                input_ids = input_ids.masked_fill(chosen, tokenizer.mask_token_id)
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": target})
    return out


def _adapter_config(folder: Path) -> dict[str, Any]:
    """An adapter folder's ``adapter_config.json`` (``{}`` for a model folder)."""
    if hf_checkpoint_kind(folder) != "adapter":
        return {}
    return json.loads((folder / "adapter_config.json").read_text())


def _model_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a model folder, or of an adapter's base model (``{}`` if unreadable)."""
    base = _adapter_config(folder).get("base_model_name_or_path")
    cfg_path = (Path(base) if base else folder) / "config.json"
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return {}


def head_of(model_folder: str | Path) -> str:
    """The head of a checkpoint folder's architecture: ``"causal"``, ``"masked"`` or ``"classification"``."""
    p = Path(model_folder)
    if _adapter_config(p).get("task_type", "") == "CAUSAL_LM":
        return "causal"
    names = _model_config(p).get("architectures") or []
    name = names[0] if names else ""
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    if name.endswith("ForMaskedLM"):
        return "masked"
    return "classification"


def _max_positions(folder: Path) -> int | None:
    """The longest sequence the checkpoint's model takes (``n_positions``/``max_position_embeddings``)."""
    cfg = _model_config(folder)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return int(cfg[key])
    return None


def text_batches(spec: str, checkpoint: str | Path, *, tokenizer: str | None = None, text_field: str = "text",
                 label_field: str = "label", max_length: int = 128, batch_size: int = 8,
                 max_samples: int | None = None) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """``--data PATH``: the file or folder as batches for the checkpoint's head (module docs)."""
    p = Path(checkpoint)
    sources: list[str | Path] = [tokenizer] if tokenizer else [p]
    base = None if tokenizer else _adapter_config(p).get("base_model_name_or_path")
    if base:
        sources.append(base)
    tok = load_tokenizer(sources)
    limit = _max_positions(p)
    if limit is not None and max_length > limit:
        logger.warning("hesd: --max-length %d is more than the model's %d positions: samples are cut to %d tokens",
                       max_length, limit, limit)  # fmt: skip
        max_length = limit
    samples, labels = read_samples(spec, text_field, label_field)
    return lm_batches(tok, samples, head=head_of(p), max_length=max_length, batch_size=batch_size,
                      max_samples=max_samples, labels=labels, group=Path(spec).suffix == ".txt")  # fmt: skip


def hf_folders(infos: list[CheckpointInfo], base_given: bool) -> list[Path]:
    """The Hugging Face folders of a series; each adapter's base model checked unless a factory builds it.

    Raises:
        CheckpointError: an adapter's base model is not a local folder (and no ``--model``).
    """
    if not base_given:
        for info in infos:
            if info.hf_kind == "adapter":
                adapter_base(info.path)
    return [info.path for info in infos if info.hf_kind is not None]


def load_batches(spec: str, option: str, hf: list[Path], **text: Any) -> Any:
    """``--data``/``--heldout``: a text file or ``datasets`` folder for HF folders, else ``MODULE:FN`` read once."""
    if is_text_data(spec):
        if not hf:
            raise HesdValueError(
                f"{option} {spec}: text data needs Hugging Face checkpoint folders (their tokenizer); for other "
                "checkpoints pass MODULE:FACTORY"
            )
        return text_batches(spec, hf[0], **text)
    # Read once: a generator must serve every checkpoint and the landscape after them.
    return as_reiterable(call_factory(load_object(spec, option), option, spec), option)
