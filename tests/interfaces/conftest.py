"""A user's project on disk: a models file with factories and a trained checkpoint series."""

from __future__ import annotations

import textwrap

import pytest
import torch

from hesd.models import DigitsMLP, load_digits_tensors
from hesd.training import TrainConfig, train_with_checkpoints

USER_MODULE = textwrap.dedent(
    """
    import torch
    from hesd.models import DigitsMLP, load_digits_tensors

    def make_model():
        torch.manual_seed(0)
        return DigitsMLP()

    def train_data():
        X, y, _, _ = load_digits_tensors()
        return [(X[i:i + 512], y[i:i + 512]) for i in range(0, len(y), 512)]

    def train_generator():
        X, y, _, _ = load_digits_tensors()
        return ((X[i:i + 512], y[i:i + 512]) for i in range(0, len(y), 512))

    def heldout_data():
        _, _, X, y = load_digits_tensors()
        return (X, y)

    def broken_factory():
        raise RuntimeError("cannot build the network")
    """
)


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    (root / "usermodels.py").write_text(USER_MODULE)
    X, y, _, _ = load_digits_tensors()
    torch.manual_seed(0)
    train_with_checkpoints(DigitsMLP(), X, y, root / "ckpts", TrainConfig(epochs=3, lr=0.05))
    return root
