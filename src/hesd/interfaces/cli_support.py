"""Pieces of the ``hesd`` command line shared by its commands: config files, JSON, errors, launch."""

from __future__ import annotations

import atexit
import difflib
import json
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer

from ..analysis.decision import decide, gap_text, series_unit
from ..analysis.rows import VIEWS, trace_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "CONFIG_KEYS",
    "EXIT_BAD_INPUT",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "HVP_HELP",
    "emit_json",
    "fail",
    "fail_collective",
    "init_distributed",
    "parse_bytes",
    "pick",
    "print_summary",
    "read_config",
    "tune_allocator",
    "write_density_plot",
]

EXIT_OK, EXIT_PARTIAL, EXIT_BAD_INPUT = 0, 1, 2

#: ``--hvp-method``'s help, the same for every command
HVP_HELP = (
    "Product method: auto (exact), graph, double_backward, func, or finite_difference (gradients only: flash "
    "attention, checkpointing; ~1e-4 relative error in float32) [auto]."
)


def tune_allocator(reuse_large: bool = True) -> None:
    """Keep glibc from returning memory to the OS between products (:func:`hesd.tune_cpu_allocator`).

    The command line owns its process, so it may. ``HESD_TUNE_ALLOCATOR=0`` leaves the allocator
    alone; BENCHMARKS.md §4 and §9 have the measurements. ``hesd analyze --max-memory`` calls it
    again with ``reuse_large=False``, so that resident memory follows the memory plan.
    """
    import os

    if os.environ.get("HESD_TUNE_ALLOCATOR", "1").strip().lower() not in ("0", "false", "no", "off"):
        from ..allocator import tune_cpu_allocator

        tune_cpu_allocator(reuse_large)


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
_STR, _INT, _FLOAT, _BOOL, _STRS = "a string", "an integer", "a number", "true or false", "a list of strings"

#: ``hesd analyze`` options a config file may set, and the TOML type each must have
CONFIG_KEYS: dict[str, str] = {
    "checkpoints": _STRS, "model": _STR, "data": _STR, "heldout": _STR, "loss": _STR, "out": _STR,
    "steps": _INT, "probes": _INT, "seed": _INT, "device": _STR, "dtype": _STR, "model_mode": _STR,
    "lr": _FLOAT, "ct_threshold": _FLOAT, "n": _FLOAT, "heldout_criteria": _BOOL, "params": _STRS,
    "max_memory": _STR, "hvp_method": _STR, "distributed": _BOOL, "parallel": _STR, "no_shard": _BOOL,
    "overwrite": _BOOL, "landscape": _BOOL, "report": _BOOL, "tokenizer": _STR, "text_field": _STR, "label_field": _STR,
    "max_length": _INT, "batch_size": _INT, "max_samples": _INT,
}  # fmt: skip


def _type_ok(value: Any, kind: str) -> bool:
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _FLOAT:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == _STRS:
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    return isinstance(value, str) or (kind == _STR and isinstance(value, int) and not isinstance(value, bool))


def read_config(path: Path | None) -> dict:
    """The options in a TOML file (its ``[hesd]`` table, or the whole file), checked; ``{}`` without a file.

    Every key must be a known option (:data:`CONFIG_KEYS`) with a value of its TOML type —
    ``overwrite = "false"`` is refused rather than read as true, ``steps = 2.5`` rather than
    truncated — and each problem is named with the key and what it must be (exit 2).
    """
    if path is None:
        return {}
    try:
        cfg = tomllib.loads(path.read_text())
    except FileNotFoundError:
        fail(f"--config: {path} does not exist.")
    except tomllib.TOMLDecodeError as exc:
        fail(f"--config: {path} is not valid TOML ({exc}). Fix the file.")
    cfg = cfg.get("hesd", cfg)
    problems = []
    for key, value in cfg.items():
        kind = CONFIG_KEYS.get(key)
        if kind is None:
            close = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}")
        elif not _type_ok(value, kind):
            problems.append(f"{key} must be {kind}, got {type(value).__name__} {value!r}")
    if problems:
        fail(f"--config {path}: " + "; ".join(problems) + f". Known keys: {', '.join(sorted(CONFIG_KEYS))}")
    if isinstance(cfg.get("checkpoints"), str):
        cfg["checkpoints"] = [cfg["checkpoints"]]
    if isinstance(cfg.get("params"), str):
        cfg["params"] = [cfg["params"]]
    return cfg


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
    """Join the torchrun job (gloo on CPU, NCCL on CUDA); returns (group, rank).

    Collectives time out after ``HESD_DIST_TIMEOUT`` seconds (default 600, not torch's 30
    minutes), so a rank that hangs (stopped, deadlocked) ends the job with an error instead of
    holding every other rank; a rank that dies is reported by the others at once.
    """
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
        from datetime import timedelta

        raw = os.environ.get("HESD_DIST_TIMEOUT", "600")
        try:
            seconds = float(raw)
            if not seconds > 0:
                raise ValueError
        except ValueError:
            fail(f"HESD_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
        dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
        atexit.register(destroy_group)  # after every rank got there (destroy_group)
    from ..distributed import note_peers

    note_peers(dist.group.WORLD)  # so a rank that dies or hangs can be named (explain_failure)
    return dist.group.WORLD, dist.get_rank()


def fail_collective(exc: RuntimeError) -> None:
    """Exit 1 with :func:`hesd.distributed.explain_failure`'s message when ``exc`` is a collective a rank broke.

    Any other ``RuntimeError`` is raised again (a traceback: a bug to report).
    """
    from ..distributed import explain_failure

    message = explain_failure(exc)
    if message is None:
        raise exc
    fail(message, code=EXIT_PARTIAL)


#: seconds a rank waits at exit for the others to reach their own teardown (gloo)
TEARDOWN_WAIT = 10.0


def destroy_group() -> None:
    """Tear the process group down at exit, once every rank has got there (gloo: a bounded wait).

    A rank that tore its gloo group down while a peer was still finishing aborted that peer
    ("terminate called without an active exception", SIGABRT), seen in
    ``tests/test_distributed.py::test_cli_under_torchrun``; ``monitored_barrier`` makes the ranks
    reach the teardown together. A rank that failed or hangs costs the others at most
    ``TEARDOWN_WAIT`` seconds. NCCL has no bounded barrier, so it is torn down at once.
    """
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=TEARDOWN_WAIT))
        except RuntimeError:  # a peer failed or is stopped: tear down regardless
            pass
    dist.destroy_process_group()


def print_summary(table, selections) -> None:
    """Print the summary columns of the table and each rule's pick with its reason."""
    cols = [c for c in VIEWS["summary"] if c in table]
    if "heldout_accuracy" in cols and table["heldout_accuracy"].isna().all():
        # no accuracy (a language model, a regression): show the held-out loss instead, or nothing
        cols = [("heldout_loss" if c == "heldout_accuracy" else c) for c in cols if c != "heldout_accuracy"
                or ("heldout_loss" in table and table["heldout_loss"].notna().any())]  # fmt: skip
    shown = table[cols].copy()
    if "trace" in shown and "trace_se" in table and table["trace_se"].notna().any():  # an SLQ trace is never bare
        shown["trace"] = [trace_text(t, se) or f"{t:.4g}" for t, se in zip(table["trace"], table["trace_se"],
                                                                           strict=True)]  # fmt: skip
        shown = shown.rename(columns={"trace": "trace ± se"})
    unit = series_unit(table)
    if unit == "step":  # Trainer folders: the series is in steps
        shown = shown.rename(columns={"epoch": "step"})
    typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for rule, sel in selections.items():
        pick = Path(sel["checkpoint"]).name if sel.get("checkpoint") else "no pick"
        gap = f" ({gap_text(sel)})" if rule != "best_heldout" and gap_text(sel) else ""
        typer.echo(f"{rule}: {pick} — {sel['reason']}{gap}")
    decision = decide(table, selections, unit)
    typer.echo(f"\n{decision.sentence}")
    for warning in decision.warnings:
        typer.echo(f"  ! {warning}")


# ------------------------------------------------------------------------------------------------ spectrum


def write_density_plot(path: Path, spec: Any, title: str) -> None:
    """``hesd spectrum --plot``: the smoothed density on a log scale, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    t, d = spec.density()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.semilogy(t, np.maximum(d, 1e-10))
    ax.axvline(0, color="k", ls=":")
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
