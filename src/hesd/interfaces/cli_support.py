"""Pieces of the ``hesd`` command line shared by its commands: config files, JSON, errors, launch."""

from __future__ import annotations

import atexit
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer

from ..analysis.rows import VIEWS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "emit_json",
    "fail",
    "init_distributed",
    "parse_bytes",
    "pick",
    "print_summary",
    "read_config",
    "tune_allocator",
]

EXIT_OK, EXIT_PARTIAL, EXIT_BAD_INPUT = 0, 1, 2


def tune_allocator() -> None:
    """Keep glibc from returning memory to the OS between products (:func:`hesd.tune_cpu_allocator`).

    The command line owns its process, so it may. ``HESD_TUNE_ALLOCATOR=0`` leaves the allocator
    alone; BENCHMARKS.md §4 has the measurements.
    """
    import os

    if os.environ.get("HESD_TUNE_ALLOCATOR", "1").strip().lower() not in ("0", "false", "no", "off"):
        from ..allocator import tune_cpu_allocator

        tune_cpu_allocator()


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code`` (2: bad input)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def clean(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def emit_json(obj: Any) -> None:
    """Print ``obj`` as JSON (NaN as null, infinities as strings)."""
    typer.echo(json.dumps(clean(obj), indent=1, default=str))


# ------------------------------------------------------------------------------------------------ demo
def read_config(path: Path | None) -> dict:
    """The options in a TOML file (its ``[hesd]`` table, or the whole file); ``{}`` without a file."""
    if path is None:
        return {}
    try:
        cfg = tomllib.loads(path.read_text())
    except FileNotFoundError:
        fail(f"--config: {path} does not exist.")
    except tomllib.TOMLDecodeError as exc:
        fail(f"--config: {path} is not valid TOML ({exc}). Fix the file.")
    return cfg.get("hesd", cfg)


def pick(cli: Any, cfg: dict, key: str, default: Any) -> Any:
    """The command-line value if given, else the config file's, else the default."""
    return cli if cli is not None else cfg.get(key, default)


def parse_bytes(text: Any) -> int | None:
    """Bytes from ``2G``, ``500M``, ``1.5GiB`` or a plain number."""
    if text is None or isinstance(text, int):
        return text
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(float(t))
    except ValueError:
        fail(f"--max-memory: cannot read {text!r}; use bytes or a suffix, e.g. 2G or 500M")
    return None


def init_distributed(enabled: bool, device: str | None) -> tuple[Any, int]:
    """Join the torchrun job (gloo on CPU, NCCL on CUDA); returns (group, rank)."""
    if not enabled:
        return None, 0
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            fail("--distributed needs a torchrun launch, e.g. torchrun --nproc_per_node=2 --no-python hesd analyze ...")
        backend = "nccl" if device and device.startswith("cuda") else "gloo"
        if backend == "nccl":
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        # Tear the group down before the interpreter exits: without it gloo's threads can be
        # destroyed mid-flight ("terminate called without an active exception"), seen once in
        # tests/test_distributed.py::test_cli_under_torchrun.
        atexit.register(destroy_group)
    return dist.group.WORLD, dist.get_rank()


def destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():  # no barrier: a rank that failed must not keep the others waiting
        dist.destroy_process_group()


def print_summary(table, selections) -> None:
    """Print the summary columns of the table and each rule's pick with its reason."""
    cols = [c for c in VIEWS["summary"] if c in table]
    if "heldout_accuracy" in cols and table["heldout_accuracy"].isna().all():
        # no accuracy (a language model, a regression): show the held-out loss instead, or nothing
        cols = [("heldout_loss" if c == "heldout_accuracy" else c) for c in cols if c != "heldout_accuracy"
                or ("heldout_loss" in table and table["heldout_loss"].notna().any())]  # fmt: skip
    shown = table[cols]
    names = [str(n) for n in table.get("name", [])]
    if names and all(re.search(r"(?:checkpoint-|step[=_-]?)\d+", n) for n in names):
        shown = shown.rename(columns={"epoch": "step"})  # Trainer folders: the series is in steps
    typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for rule, sel in selections.items():
        pick = Path(sel["checkpoint"]).name if sel.get("checkpoint") else "no pick"
        gap = ""
        if sel.get("gap_to_best") is not None and rule != "best_heldout":
            if sel.get("gap_metric") == "heldout_loss":
                gap = f" (held-out loss {sel['heldout_loss']:.4g}, {sel['gap_to_best']:+.4g} vs the best)"
            else:
                points = 100 * sel["gap_to_best"]
                gap = f" (held-out accuracy {sel['heldout_accuracy']:.4g}, {points:.2f} points below the best)"
        typer.echo(f"{rule}: {pick} — {sel['reason']}{gap}")


# ------------------------------------------------------------------------------------------------ spectrum
