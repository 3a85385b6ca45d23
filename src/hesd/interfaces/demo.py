"""``hesd demo``: the embedded default job."""

from __future__ import annotations

import tempfile

import numpy as np
import torch

import hesd
from hesd.models import DigitsMLP, load_digits_tensors
from hesd.training import TrainConfig, train_with_checkpoints


def text_histogram(spectrum: hesd.Spectrum, bins: int = 24, width: int = 50) -> str:
    """A log-scaled text histogram of the smoothed density."""
    t, d = spectrum.density(np.linspace(spectrum.lambda_min, spectrum.lambda_max, bins))
    logd = np.log10(np.maximum(d, 1e-12))
    lo = logd.min()
    span = max(logd.max() - lo, 1e-12)
    lines = [f"{x:>10.4g} | " + "#" * max(1, round(width * (v - lo) / span)) for x, v in zip(t, logd, strict=True)]
    return "\n".join(lines)


def run_demo() -> None:
    torch.manual_seed(0)
    X, y, _, _ = load_digits_tensors()
    model = DigitsMLP()
    with tempfile.TemporaryDirectory() as tmp:
        train_with_checkpoints(model, X, y, tmp, TrainConfig(epochs=5))
    op = hesd.HessianOperator(model, torch.nn.functional.cross_entropy, (X, y))
    ends = hesd.eigenvalues(op, k=2, which="BE", tol=1e-4)
    tr = hesd.trace(op, num_matvecs=60)
    spec = hesd.slq(op, num_steps=60, num_probes=2)
    print(f"lambda_min {float(ends.eigenvalues[0]):.5g}  lambda_max {float(ends.eigenvalues[1]):.5g}")
    print(f"trace {tr.estimate:.5g} ± {tr.stderr:.2g}")
    print(text_histogram(spec))
