"""Hugging Face checkpoint folders: ``Trainer`` output and PEFT adapters, as checkpoints of a series.

A folder is a Hugging Face checkpoint when it holds ``config.json`` with weights
(``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``)
or a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``). Such a
folder is *one* checkpoint: the ``Trainer``'s other files (``optimizer.pt``, ``rng_state.pth``,
``scheduler.pt``, ``training_args.bin``) are never opened.

* The model is built from the folder's ``config.json`` (its ``architectures`` entry) with
  ``from_pretrained``: safetensors, sharded files and tied weights (``lm_head`` = ``wte``) are
  handled by ``transformers``; a ``pytorch_model.bin`` is read only with
  ``torch.load(weights_only=True)`` (``transformers``' own default), so no pickle runs.
* An adapter is loaded onto its base model, found at the adapter config's
  ``base_model_name_or_path`` when that is a local folder, or built by a given factory
  (CLI: ``--model``); its trainable parameters are the adapter's.
* The position in the series is ``global_step`` from ``trainer_state.json`` (else the number in
  ``checkpoint-500``), and the epoch is read from there as well.
* The fingerprint is the SHA-256 of the weight files' bytes, in name order.

``transformers`` and ``peft`` are imported only here, and only when such a folder is met; a
missing one is a :class:`hesd.HesdError` naming the extra to install.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError, HesdValueError

__all__ = [
    "MissingExtraError",
    "adapter_base",
    "hf_checkpoint_kind",
    "hf_fingerprint",
    "load_hf_checkpoint",
    "require",
    "trainer_position",
]

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class MissingExtraError(HesdValueError, ImportError):
    """An optional dependency is needed and not installed."""


def require(module: str, extra: str = "transformers") -> Any:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``pip install 'hesd[extra]'``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"this needs the '{module}' package, which is not installed: pip install 'hesd[{extra}]'"
        ) from None


def hf_checkpoint_kind(path: str | Path) -> str | None:
    """``"model"``, ``"adapter"`` or ``None``: whether ``path`` is a Hugging Face checkpoint folder."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / "adapter_config.json").is_file() and any((p / w).is_file() for w in _ADAPTER_WEIGHTS):
        return "adapter"
    if (p / "config.json").is_file() and any((p / w).is_file() for w in _WEIGHTS):
        return "model"
    return None


def _weight_files(p: Path) -> list[Path]:
    if hf_checkpoint_kind(p) == "adapter":
        return [p / w for w in _ADAPTER_WEIGHTS if (p / w).is_file()]
    files = [p / w for w in _WEIGHTS if (p / w).is_file()]
    for index in [f for f in files if f.name.endswith(".index.json")]:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: unreadable shard index ({exc})") from None
        files.extend(p / s for s in shards)
    return sorted(set(files))


def hf_fingerprint(path: str | Path) -> str:
    """SHA-256 over the names and bytes of the folder's weight files (module docs)."""
    h = hashlib.sha256()
    for f in _weight_files(Path(path)):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def trainer_position(path: str | Path) -> tuple[int | None, float | None]:
    """``(global_step, epoch)`` from the folder's ``trainer_state.json`` (``None`` where unknown)."""
    state = Path(path) / "trainer_state.json"
    if not state.is_file():
        return None, None
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):
        return None, None
    step, epoch = data.get("global_step"), data.get("epoch")
    return (int(step) if isinstance(step, int) else None), (float(epoch) if isinstance(epoch, (int, float)) else None)


def _model_class(config: Any, where: Path) -> Any:
    transformers = require("transformers")
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise CheckpointError(
        f"{where}: config.json names no architecture this transformers knows ({names or 'none'}); pass --model "
        "MODULE:FACTORY building the model"
    )


def load_hf_checkpoint(
    path: str | Path, base_factory: Callable[[], nn.Module] | None = None, *, model_factory: Any = None
) -> nn.Module:
    """The model of a Hugging Face checkpoint folder, weights loaded (module docs).

    Args:
        path: a ``Trainer`` checkpoint or PEFT adapter folder.
        base_factory: for an adapter, builds its base model (default: from the adapter
            config's ``base_model_name_or_path``, which must be a local folder).
        model_factory: for a full model, builds it instead of ``config.json``'s architecture;
            the folder's weights are then loaded into it with ``from_pretrained``'s loader.

    Raises:
        CheckpointError: the folder cannot be loaded, or an adapter's base model is not found.
        MissingExtraError: ``transformers`` (or ``peft`` for an adapter) is not installed.
    """
    p = Path(path)
    kind = hf_checkpoint_kind(p)
    if kind is None:
        raise CheckpointError(f"{p}: not a Hugging Face checkpoint folder (no config.json with weights, no adapter)")
    if kind == "adapter":
        return _load_adapter(p, base_factory)
    transformers = require("transformers")
    try:
        if model_factory is not None:
            from .checkpoints import apply_state_dict

            model = model_factory()
            apply_state_dict(model, _folder_state(p), p)  # tied aliases saved once are filled in
            return model
        config = transformers.AutoConfig.from_pretrained(str(p))
        with _quiet(transformers):
            return _model_class(config, p).from_pretrained(str(p), config=config)
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{p}: cannot load the Hugging Face checkpoint ({first})") from None


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No "Loading weights" progress bar per checkpoint (hesd shows its own progress)."""
    logging_ = transformers.utils.logging
    was = logging_.is_progress_bar_enabled()
    logging_.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging_.enable_progress_bar()


def _folder_state(p: Path) -> dict[str, Any]:
    from .checkpoints import load_state_dict

    state: dict[str, Any] = {}
    for f in _weight_files(p):
        if not f.name.endswith(".json"):
            state.update(load_state_dict(f))
    return state


def adapter_base(path: str | Path) -> str:
    """The local base-model folder of an adapter folder.

    Raises:
        CheckpointError: the adapter config is unreadable, or its base model is not a local folder.
    """
    p = Path(path)
    try:
        cfg = json.loads((p / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{p}/adapter_config.json: unreadable ({exc})") from None
    base_path = cfg.get("base_model_name_or_path")
    if not base_path or hf_checkpoint_kind(base_path) != "model":
        raise CheckpointError(
            f"{p}: the adapter's base model {base_path!r} is not a local model folder (nothing is downloaded). Pass "
            "--model MODULE:FACTORY returning the base model (library: base_factory=...), or save the base model "
            "with save_pretrained and set base_model_name_or_path in adapter_config.json to that folder"
        )
    return str(base_path)


def _load_adapter(p: Path, base_factory: Callable[[], nn.Module] | None) -> nn.Module:
    peft = require("peft")
    base = base_factory() if base_factory is not None else load_hf_checkpoint(adapter_base(p))
    try:
        with _quiet(require("transformers")):
            return peft.PeftModel.from_pretrained(base, str(p), is_trainable=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{p}: cannot load the adapter onto its base model ({first})") from None
