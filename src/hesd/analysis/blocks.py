"""Block analysis: where does negative curvature sit? One HESD per layer or block."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
from torch import nn

from .model import analyze_model
from .rows import VIEWS
from .settings import AnalysisSettings

__all__ = ["analyze_blocks", "default_blocks"]


def default_blocks(model: nn.Module, depth: int = 1) -> dict[str, list[str]]:
    """Blocks = the model's sub-modules at ``depth`` that own trainable parameters (name → patterns)."""
    blocks: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:depth]) if len(parts) > depth else name
        blocks.setdefault(key, [f"{key}.*" if key != name else name])
    return blocks


def analyze_blocks(
    model: nn.Module,
    data: Any,
    *,
    blocks: dict[str, list[str]] | None = None,
    loss_fn: Callable = nn.functional.cross_entropy,
    settings: AnalysisSettings | None = None,
) -> pd.DataFrame:
    """The HESD of each diagonal block of the Hessian (one per layer or group of parameters).

    Args:
        model: as for :func:`hesd.analyze_model`.
        data: as for :func:`hesd.analyze_model`.
        loss_fn: as for :func:`hesd.analyze_model`.
        blocks: block name → ``fnmatch`` patterns of parameter names; default
            :func:`default_blocks` (top-level sub-modules).
        settings: :class:`hesd.AnalysisSettings` (its ``params`` is replaced per block).

    Returns:
        One row per block: parameters, λmin, λmax, re, KH05, Ct, HESD type.

    Examples:
        >>> import torch, hesd
        >>> from hesd.analysis import analyze_blocks
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        >>> data = (torch.randn(20, 4), torch.randint(0, 3, (20,)))
        >>> t = analyze_blocks(m, data, settings=hesd.AnalysisSettings(num_steps=10, num_probes=1))
        >>> t["block"].tolist()
        ['0', '2']
    """
    base = settings or AnalysisSettings()
    rows = []
    for name, patterns in (blocks or default_blocks(model)).items():
        s = AnalysisSettings(**{**base.to_dict(), "params": list(patterns)})
        row, _ = analyze_model(model, data, loss_fn=loss_fn, settings=s)
        rows.append({"block": name, "num_params": row["num_params"], **{k: row[k] for k in VIEWS["blocks"]}})
    return pd.DataFrame(rows)
