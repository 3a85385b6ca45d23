"""Checkpoint discovery, formats, fingerprints and safety."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hesd.analysis import apply_state_dict, discover_checkpoints, load_state_dict, parse_epoch, sha256_file
from hesd.errors import CheckpointError, InsecureCheckpointError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize(
    ("name", "epoch"),
    [("epoch_012.pt", 12), ("model-step=300.ckpt", 300), ("ep7.pth", 7), ("run3_final_45.pt", 45), ("last.pt", None)],
)
def test_parse_epoch(name, epoch):
    assert parse_epoch(name) == epoch


def test_discover_orders_by_epoch_and_accepts_globs(tmp_path):
    for e in (10, 2, 1):
        torch.save({}, tmp_path / f"epoch_{e}.pt")
    (tmp_path / "notes.txt").write_text("x")
    infos = discover_checkpoints(tmp_path)
    assert [i.epoch for i in infos] == [1, 2, 10]
    assert [i.epoch for i in discover_checkpoints(str(tmp_path / "epoch_1*.pt"))] == [1, 10]
    assert [i.epoch for i in discover_checkpoints([tmp_path / "epoch_2.pt"], epochs=[5])] == [5]
    with pytest.raises(FileNotFoundError, match="matches nothing"):
        discover_checkpoints(tmp_path / "nope_*.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint files"):
        discover_checkpoints(empty)


def test_formats_roundtrip(tmp_path):
    m = _model()
    sd = m.state_dict()
    torch.save(sd, tmp_path / "a.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "b.safetensors"))
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in sd.items()}}, tmp_path / "c.ckpt")
    torch.save({"model_state_dict": sd, "optimizer_state_dict": {}}, tmp_path / "d.pth")
    for f in ("a.pt", "b.safetensors", "c.ckpt", "d.pth"):
        target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        apply_state_dict(target, load_state_dict(tmp_path / f), f)
        for k, v in target.state_dict().items():
            assert torch.equal(v, sd[k]), (f, k)
    assert len(sha256_file(tmp_path / "a.pt")) == 64


def test_malicious_pickle_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "payload": _Evil(str(marker))}, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(InsecureCheckpointError, match="refused to load"):
        load_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_truncated_and_garbage_files(tmp_path):
    torch.save(_model().state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_state_dict(tmp_path / "trunc.pt")
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors"):
        load_state_dict(tmp_path / "garbage.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_dict(tmp_path / "list.pt")


def test_mismatch_lists_every_problem():
    sd = _model().state_dict()
    sd["2.weight"] = torch.zeros(5, 4)
    sd["extra.bias"] = torch.zeros(1)
    del sd["0.bias"]
    with pytest.raises(CheckpointError) as err:
        apply_state_dict(_model(), sd, "x.pt")
    msg = str(err.value)
    assert "missing from the checkpoint: 0.bias" in msg
    assert "not in the model: extra.bias" in msg
    assert "2.weight: checkpoint (5, 4) vs model (2, 4)" in msg
