"""Helpers shared by the CLI, the demo and the callbacks: object loading, progress bars, landscapes."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..analysis.checkpoints import apply_state_dict, load_state_dict
from ..analysis.hf_checkpoints import hf_checkpoint_kind, load_hf_checkpoint
from ..analysis.landscape import loss_landscape
from ..analysis.store import ResultStore
from ..errors import HesdValueError

__all__ = ["BadInput", "Progress", "call_factory", "load_object", "store_landscape"]


class BadInput(HesdValueError):
    """A user-facing input problem (exit code 2 on the command line)."""


def load_object(spec: str, option: str) -> Any:
    """Resolve ``package.module:attr`` or ``path/to/file.py:attr`` (the uvicorn/gunicorn convention)."""
    if ":" not in spec:
        raise BadInput(
            f"{option} expects MODULE:ATTR (for example mypkg.models:make_model or ./train.py:make_model), got "
            f"{spec!r}. Name the module and the factory function inside it, separated by a colon."
        )
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py") or "/" in mod_name or "\\" in mod_name:
            path = Path(mod_name).expanduser().resolve()
            if not path.is_file():
                raise BadInput(
                    f"{option}: the file {path} does not exist. Check the path before the colon in {spec!r}."
                )
            name = f"_hesd_user_{path.stem}_{abs(hash(str(path)))}"
            module = sys.modules.get(name)
            if module is None:
                sys.path.insert(0, str(path.parent))
                s = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(s)  # type: ignore[arg-type]
                sys.modules[name] = module
                s.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            if str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(mod_name)
    except BadInput:
        raise
    except ModuleNotFoundError as exc:
        raise BadInput(
            f"{option}: cannot import module {mod_name!r} ({exc}). Run from the folder that contains it, install "
            "the package, or give a file path such as ./models.py:make_model."
        ) from None
    except Exception as exc:
        raise BadInput(
            f"{option}: importing {mod_name!r} raised {type(exc).__name__}: {exc}. Fix that module."
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")][:12]
            raise BadInput(
                f"{option}: module {mod_name!r} has no attribute {attr!r}. Available names include: "
                f"{', '.join(names)}. Check the part after the colon in {spec!r}."
            )
        obj = getattr(obj, part)
    return obj


def call_factory(factory: Any, option: str, spec: str) -> Any:
    """Call a user factory (or return a non-callable object as is), turning its errors into BadInput."""
    if not callable(factory):
        return factory
    try:
        return factory()
    except Exception as exc:
        raise BadInput(
            f"{option}: the factory {spec} raised {type(exc).__name__}: {exc}. Fix the factory; it must take no "
            "arguments and return " + ("an nn.Module." if option == "--model" else "an iterable of (inputs, targets).")
        ) from None


class Progress:
    """tqdm bars for :func:`hesd.analyze_checkpoints` events; silent when quiet or not on a terminal."""

    def __init__(self, quiet: bool = False, steps_per_checkpoint: int = 0) -> None:
        self.disable = quiet or not sys.stderr.isatty()
        self.steps = steps_per_checkpoint
        self.outer: tqdm | None = None
        self.inner: tqdm | None = None

    def __call__(self, event: str, payload: Any) -> None:
        if self.disable:
            return
        if event == "start":
            self.outer = tqdm(total=len(payload), desc="checkpoints", unit="ckpt", position=0)
        elif event == "checkpoint":
            self.inner = tqdm(total=self.steps, desc=payload.name, unit="step", leave=False, position=1)
        elif event == "step" and self.inner is not None:
            self.inner.update(1)
        elif event in ("done", "cached"):
            if self.inner is not None:
                self.inner.close()
                self.inner = None
            if self.outer is not None:
                self.outer.update(1)
                if self.outer.n >= self.outer.total:
                    self.outer.close()

    def close(self) -> None:
        for bar in (self.inner, self.outer):
            if bar is not None:
                bar.close()


def store_landscape(
    out_dir: str | Path,
    model_factory: Callable | None,
    data: Any,
    loss_fn: Any,
    selections: dict[str, dict],
    *,
    model_mode: str = "eval",
    trust_pickle: bool = False,
    dtype: Any = None,
    seed: int = 0,
    hvp_method: str = "auto",
    max_memory: int | None = None,
) -> dict | None:
    """Compute the loss landscape of the paper's pick (else the λmax pick) and store ``landscape.json``.

    ``max_memory`` (the analysis's ``--max-memory``) bounds its eigen solver as it bounded the analysis.
    """
    for rule in ("highest_ct_mp", "smallest_lambda_max"):
        ckpt = selections.get(rule, {}).get("checkpoint")
        if ckpt:
            break
    else:
        return None
    kind = hf_checkpoint_kind(ckpt)
    if kind is not None:
        model = load_hf_checkpoint(ckpt, model_factory if kind == "adapter" else None,
                                   model_factory=model_factory if kind == "model" else None)  # fmt: skip
    else:
        assert model_factory is not None, "checkpoint files need a model factory"
        model = model_factory()
    if dtype is not None:
        model = model.to(dtype)
    if kind is None:
        apply_state_dict(model, load_state_dict(ckpt, trust_pickle=trust_pickle), ckpt)
    land = loss_landscape(model, loss_fn, data, seed=seed, model_mode=model_mode, hvp_method=hvp_method,
                          max_memory=max_memory)  # fmt: skip
    land.update(checkpoint=str(ckpt), rule=rule)
    store = ResultStore.open_existing(out_dir)
    store.write_json("landscape.json", land)
    return land
