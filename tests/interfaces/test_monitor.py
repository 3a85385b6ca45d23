"""Training-time monitoring: hand-written loop, TensorBoard, Lightning and transformers callbacks."""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest
import torch
from torch import nn

import hesd
from hesd.models import DigitsMLP, load_digits_tensors

FAST = hesd.AnalysisSettings(num_steps=10, num_probes=2, refine_extremes=False)


def _train_epoch(model, opt, X, y):
    model.train()
    for i in range(0, len(y), 128):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[i : i + 128]), y[i : i + 128]).backward()
        opt.step()


def test_monitor_in_a_hand_written_loop(tmp_path):
    X, y, Xh, yh = load_digits_tensors()
    torch.manual_seed(0)
    model = DigitsMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tb = tmp_path / "tb" if importlib.util.find_spec("tensorboard") else None
    mon = hesd.Monitor(model, (X, y), heldout=(Xh, yh), out_dir=tmp_path / "mon", settings=FAST, every=2,
                       tensorboard=tb)  # fmt: skip
    rows = []
    for epoch in range(1, 5):
        _train_epoch(model, opt, X, y)
        rows.append(mon.step(epoch))
    assert rows[0] is None and rows[2] is None and rows[1]["epoch"] == 2
    t = mon.table
    assert list(t["epoch"]) == [2, 4] and (t["status"] == "ok").all()
    assert pd.read_csv(tmp_path / "mon" / "results.csv")["epoch"].tolist() == [2, 4]
    assert len(list((tmp_path / "mon" / "checkpoints").glob("*.safetensors"))) == 2
    assert model.training  # mode restored
    report = mon.finalize()
    assert report.exists() and (tmp_path / "mon" / "landscape.json").exists()
    if tb is not None:
        assert list(tb.glob("events.out.tfevents.*"))
    # The same folder is readable by `hesd report` and resumes: a new Monitor sees the old rows.
    mon2 = hesd.Monitor(model, (X, y), out_dir=tmp_path / "mon", settings=FAST, every=2)
    assert len(mon2.table) == 2


def test_monitor_records_failure_without_stopping_training():
    model = nn.Linear(4, 3)
    X = torch.randn(16, 4)
    X[0, 0] = float("inf")
    mon = hesd.Monitor(model, (X, torch.randint(0, 3, (16,))), settings=FAST)
    with pytest.warns(RuntimeWarning, match="failed"):
        row = mon.step(1)
    assert row["status"] == "failed" and "loss is" in row["error"]
    with pytest.raises(ValueError, match="every must be a positive integer"):
        hesd.Monitor(model, (X, X), every=0)


def test_monitor_survives_any_analysis_error():
    """A dict batch (TypeError before 0.2.0 escaped Monitor.step and ended the training run) and a
    model bug raising KeyError: each becomes a failed row and a warning."""
    model = nn.Linear(4, 3)
    mon = hesd.Monitor(model, [{"x": torch.randn(8, 4)}], settings=FAST)
    with pytest.warns(RuntimeWarning, match="HesdTypeError.*got a dict.*training goes on"):
        row = mon.step(1)
    assert row["status"] == "failed" and "dict" in row["error"]

    class Buggy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.lin(x)}["missing"]

    mon = hesd.Monitor(Buggy(), (torch.randn(8, 4), torch.randint(0, 3, (8,))), settings=FAST)
    with pytest.warns(RuntimeWarning, match="KeyError"):
        assert mon.step(2)["status"] == "failed"
    assert mon.table["status"].tolist() == ["failed"]


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning not installed (hesd[lightning])")
def test_lightning_callback(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    cb = hesd.HesdLightningCallback((X, y), tmp_path / "pl", every_n_epochs=1, settings=FAST)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb, ckpt])  # fmt: skip
    trainer.fit(Module(), DataLoader(TensorDataset(X, y), batch_size=16))
    t = pd.read_csv(tmp_path / "pl" / "results.csv")
    # Lightning's own numbering (ModelCheckpoint writes epoch=0-step=4.ckpt after the first epoch): one
    # convention, and epoch 0 is a trained epoch, not the initialisation, so a rule may pick it
    assert t["epoch"].tolist() == [0, 1] and (t["status"] == "ok").all() and not t["initial"].any()
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names[0].startswith("epoch=0-step=")
    from hesd.analysis.checkpoints import discover_checkpoints

    infos = discover_checkpoints(tmp_path / "ckpt")
    assert [i.epoch for i in infos] == [0, 1] and not any(i.initial for i in infos)
    assert (tmp_path / "pl" / "report.html").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers/accelerate not installed (hesd[transformers])",
)
def test_transformers_trainer_callback(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 30, (24, 6), generator=g)
    labels = torch.randint(0, 2, (24,), generator=g)
    train = [{"input_ids": ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": labels[i]}
             for i in range(24)]  # fmt: skip
    hess_data = ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels)
    cb = hesd.HesdTrainerCallback(hess_data, tmp_path / "hf", every_n_epochs=1, settings=FAST)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), num_train_epochs=2, per_device_train_batch_size=8,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=train, callbacks=[cb]).train()
    t = pd.read_csv(tmp_path / "hf" / "results.csv")
    # numbered by global step (3 steps per epoch); (inputs, labels) pairs with the model's own loss
    assert t["epoch"].tolist() == [3, 6] and (t["status"] == "ok").all()
    assert (tmp_path / "hf" / "report.html").exists()
