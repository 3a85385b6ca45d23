"""Run a checkpoint-series analysis in a subprocess (used by the kill-and-resume test)."""

from __future__ import annotations

import sys

import torch

import hesd
from hesd.models import DigitsMLP, load_digits_tensors

if __name__ == "__main__":
    torch.set_num_threads(1)
    ckpt_dir, out_dir = sys.argv[1], sys.argv[2]
    X, y, Xh, yh = load_digits_tensors()
    settings = hesd.AnalysisSettings(num_steps=60, num_probes=3, seed=0, lr=0.05)
    res = hesd.analyze_checkpoints(DigitsMLP, ckpt_dir, (X, y), heldout=(Xh, yh), out_dir=out_dir, settings=settings)
    print(len(res.table), "rows;", len(res.failed), "failed")
