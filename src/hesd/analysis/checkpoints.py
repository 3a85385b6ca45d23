"""Finding, ordering, fingerprinting and safely loading checkpoints.

Formats: PyTorch state dicts (``.pt``, ``.pth``, ``.bin``) loaded with
``torch.load(weights_only=True)`` — an arbitrary pickle is refused, never executed —
``.safetensors``, and Lightning ``.ckpt`` files (``state_dict`` inside; a ``model.``-style
prefix is stripped). Dicts with a ``state_dict``, ``model_state_dict`` or ``model`` entry
(common in hand-written loops) are unwrapped. A Hugging Face checkpoint *folder* (``Trainer``
output, a PEFT adapter: :mod:`hesd.analysis.hf_checkpoints`) is one checkpoint.
"""

from __future__ import annotations

import glob
import hashlib
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, HesdFileNotFoundError, HesdValueError, InsecureCheckpointError
from .hf_checkpoints import hf_checkpoint_kind, hf_fingerprint, trainer_position

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CheckpointInfo",
    "apply_state_dict",
    "discover_checkpoints",
    "load_state_dict",
    "parse_epoch",
    "sha256_file",
    "tied_groups",
]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_EPOCH_RE = re.compile(r"(?:epoch|step|ep|iter|it|global_step)[=_\-]?(\d+)", re.IGNORECASE)
_NUM_RE = re.compile(r"(\d+)(?!.*\d)")
_STEP_RE = re.compile(r"step[=_\-]?(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint (a file, or a Hugging Face checkpoint folder) and its position in the series.

    Attributes:
        path: the file or folder.
        epoch: its position: the epoch or step in its name, or ``global_step`` of a ``Trainer`` folder.
        train_epoch: the (fractional) training epoch a ``Trainer`` folder records, else ``None``.
    """

    path: Path
    epoch: int | None
    train_epoch: float | None = None

    @property
    def initial(self) -> bool:
        """Whether the checkpoint is the initialisation: position 0 and no later step in its name.

        ``epoch_000.pt`` and ``init.pt`` are; Lightning's ``epoch=0-step=10.ckpt`` (saved after the
        first epoch) and a ``Trainer`` folder with ``global_step`` > 0 are not.
        """
        name = self.path.name.lower()
        if re.search(r"(?<![a-z])init", name):
            return True
        if self.epoch != 0:
            return False
        step = _STEP_RE.search(name)
        return step is None or int(step.group(1)) == 0

    @property
    def hf_kind(self) -> str | None:
        """``"model"`` or ``"adapter"`` for a Hugging Face checkpoint folder, else ``None``."""
        return hf_checkpoint_kind(self.path)

    @property
    def name(self) -> str:
        """The file name."""
        return self.path.name


def parse_epoch(name: str) -> int | None:
    """Epoch or step parsed from a file name: ``epoch_012.pt`` → 12, ``step=300.ckpt`` → 300.

    Falls back to the last number in the stem; ``None`` when there is none.
    """
    stem = Path(name).name
    for suffix in CHECKPOINT_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    m = _EPOCH_RE.search(stem)
    if m:
        return int(m.group(1))
    m = _NUM_RE.search(stem)
    return int(m.group(1)) if m else None


def discover_checkpoints(
    sources: str | Path | Iterable[str | Path], epochs: Iterable[int] | None = None
) -> list[CheckpointInfo]:
    """Expand files, folders and glob patterns into checkpoints ordered by epoch, then name.

    Args:
        sources: paths, folders (their checkpoint files, not recursive) or glob patterns.
        epochs: explicit epochs, one per checkpoint in the order given (no sorting then).

    Raises:
        FileNotFoundError: a source matches nothing, or no checkpoint is found at all.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    found: list[Path] = []
    for src in sources:
        p = Path(src)
        if hf_checkpoint_kind(p):
            found.append(p)
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(CHECKPOINT_SUFFIXES))
            files = files or sorted(f for f in p.iterdir() if hf_checkpoint_kind(f))  # a Trainer's output_dir
            if not files:
                raise HesdFileNotFoundError(
                    f"discover_checkpoints: folder {p} holds no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) "
                    "and no Hugging Face checkpoint folders (config.json + model.safetensors, or a PEFT adapter)"
                )
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(src)))
            matches = [m for m in matches if m.is_file() or hf_checkpoint_kind(m)]
            if not matches:
                raise HesdFileNotFoundError(f"discover_checkpoints: {src} is not a file or folder and matches nothing")
            found.extend(matches)
    unique = list(dict.fromkeys(f.resolve() for f in found))
    if epochs is not None:
        epochs = list(epochs)
        if len(epochs) != len(unique):
            raise HesdValueError(f"discover_checkpoints: {len(epochs)} epochs given for {len(unique)} checkpoints")
        return [CheckpointInfo(p, int(e)) for p, e in zip(unique, epochs, strict=True)]
    infos = [_info(p) for p in unique]
    return sorted(infos, key=lambda c: (c.epoch is None, c.epoch if c.epoch is not None else 0, c.name))


def _info(p: Path) -> CheckpointInfo:
    if hf_checkpoint_kind(p):
        step, epoch = trainer_position(p)
        return CheckpointInfo(p, step if step is not None else parse_epoch(p.name), epoch)
    return CheckpointInfo(p, parse_epoch(p.name))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (the checkpoint's fingerprint); of its weight files for a HF folder."""
    if hf_checkpoint_kind(path):
        return hf_fingerprint(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):  # pragma: no cover - only reachable with trust_pickle
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict; save model.state_dict()")
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found; expected a state dict (or a dict with 'state_dict')")
    return tensors


def load_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors on the CPU, safely.

    Args:
        path: ``.pt``/``.pth``/``.bin``/``.ckpt`` (PyTorch) or ``.safetensors``.
        trust_pickle: allow arbitrary unpickling (executes code from the file!). Only for
            files you created yourself; default ``False``.

    Raises:
        InsecureCheckpointError: the file needs arbitrary unpickling.
        CheckpointError: the file is truncated, corrupt or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError, OverflowError) as exc:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path}: a TorchScript archive (torch.jit.save), not a state dict; save model.state_dict() with "
            "torch.save, or as .safetensors"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "Weights only load failed" in msg or "weights_only" in msg:
            found = _GLOBAL_RE.search(msg)
            what = f" ({found.group(1)})" if found else ""
            raise InsecureCheckpointError(
                f"{path}: refused to load: the file contains pickled Python objects{what} that would run code when "
                "loaded (torch.load(weights_only=True) rejected it). Re-save it as a plain state dict "
                "(torch.save(model.state_dict(), ...)) or as .safetensors; if you created it yourself and trust "
                "it, pass trust_pickle=True (CLI: --trust-pickle)"
            ) from None
        raise CheckpointError(f"{path}: corrupt checkpoint ({msg.splitlines()[0] if msg else 'unpickling'})") from None
    except Exception as exc:  # a corrupt file can raise anything from the unpickler (IndexError, KeyError, ...)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {first}); re-save or remove it"
        ) from None
    return _unwrap(obj, path)


_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with a ``code/`` folder or ``constants.pkl``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


def _strip_prefix(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    if set(sd) & expected:
        return sd
    for key in sd:
        parts = key.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i]) + "."
            stripped = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            if stripped and set(stripped) >= expected - {k for k in expected if k.endswith("num_batches_tracked")}:
                return stripped
        break
    return sd


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter (tied weights, e.g. ``lm_head.weight`` and ``transformer.wte.weight``)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _fill_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict saved without a tied alias (safetensors stores shared tensors once) gets it back."""
    groups = tied_groups(model)
    if not groups:
        return state
    state = dict(state)
    for names in groups:
        present = [n for n in names if n in state]
        for n in names:
            if n not in state and present:
                state[n] = state[present[0]]
    return state


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path = "checkpoint") -> None:
    """Load ``state`` into ``model`` after checking names and shapes; list every mismatch.

    A Lightning-style prefix (``model.``, ``net.``, ``module.``) is stripped when the bare
    names do not match.
    """
    own = model.state_dict()
    state = _strip_prefix(state, set(own))
    state = _fill_tied(model, state)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(
                f"missing from the checkpoint: {', '.join(missing[:10])}" + (" …" if len(missing) > 10 else "")
            )
        if unexpected:
            parts.append(f"not in the model: {', '.join(unexpected[:10])}" + (" …" if len(unexpected) > 10 else ""))
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes[:10]))
        raise CheckpointError(
            f"{path}: does not match the model ({'; '.join(parts)}). Check that the model factory builds the "
            "architecture the checkpoint was trained with"
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
