"""A corrupt checkpoint is that checkpoint's failed row, never a crash of the series.

The corpus is made here, seeded: truncations at every kind of offset, flipped bytes, zeroed
blocks and foreign files (text, JSON, an empty file, a zip of something else, a TorchScript
archive) under checkpoint names, from a real state dict saved as .pt and as .safetensors.
Every one must give a CheckpointError or InsecureCheckpointError naming the file.
"""

from __future__ import annotations

import io
import random
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import hesd
from hesd.analysis.checkpoints import load_state_dict
from hesd.errors import CheckpointError, InsecureCheckpointError


def _corpus(tmp_path):
    torch.manual_seed(0)
    sd = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    pt = buf.getvalue()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "ok.safetensors"))
    st = (tmp_path / "ok.safetensors").read_bytes()
    rng = random.Random(7)
    files = []
    for name, good in (("pt", pt), ("safetensors", st)):
        ext = ".pt" if name == "pt" else ".safetensors"
        cuts = sorted(
            {1, 2, 7, 8, 9, 16, 64, len(good) // 3, len(good) // 2, len(good) - 1, *rng.sample(range(1, len(good)), 30)}
        )
        for i, cut in enumerate(cuts):
            files.append((f"{name}_cut{i}{ext}", good[:cut]))
        for i in range(60):
            b = bytearray(good)
            for _ in range(rng.choice((1, 4, 32))):
                b[rng.randrange(len(b))] = rng.randrange(256)
            files.append((f"{name}_flip{i}{ext}", bytes(b)))
        for i in range(10):
            b = bytearray(good)
            start = rng.randrange(len(b))
            b[start : start + rng.choice((8, 64, 512))] = bytes(min(len(b) - start, 512))
            files.append((f"{name}_zero{i}{ext}", bytes(b)))
        files.append((f"{name}_text{ext}", b"this is not a checkpoint\n"))
        files.append((f"{name}_empty{ext}", b""))
        files.append((f"{name}_json{ext}", b'{"weights": [1, 2, 3]}'))
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("data.txt", "hello")
    files.append(("foreign_zip.pt", z.getvalue()))
    script = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    files.append(("torchscript.pt", script.getvalue()))
    paths = []
    for name, blob in files:
        p = tmp_path / name
        p.write_bytes(blob)
        paths.append(p)
    return paths


@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated")  # making the TorchScript sample
def test_every_corrupt_file_is_a_checkpoint_error(tmp_path):
    paths = _corpus(tmp_path)
    assert len(paths) > 200
    escaped = []
    for p in paths:
        try:
            load_state_dict(p)
        except (CheckpointError, InsecureCheckpointError) as exc:
            assert p.name in str(exc)
        except Exception as exc:
            escaped.append(f"{p.name}: {type(exc).__name__}: {exc}")
    assert not escaped, escaped[:10]


def test_a_series_survives_its_corrupt_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))  # noqa: E731
    good = tmp_path / "run"
    good.mkdir()
    torch.save(model().state_dict(), good / "epoch_0.pt")
    (good / "epoch_1.pt").write_text("a text file under a checkpoint name")
    torch.save(model().state_dict(), good / "epoch_2.pt")
    data = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    settings = hesd.AnalysisSettings(num_steps=5, num_probes=1, refine_extremes=False)
    res = hesd.analyze_checkpoints(model, good, data, settings=settings)
    assert res.table["status"].tolist() == ["ok", "failed", "ok"]
    assert "epoch_1.pt" in res.table["error"].iloc[1]


def test_which_checkpoint_is_the_initialisation(tmp_path):
    from hesd.analysis.checkpoints import CheckpointInfo

    cases = {"epoch_000.pt": True, "init.pt": True, "model_init_3.pt": True, "epoch=0-step=10.ckpt": False,
             "epoch=0-step=0.ckpt": True, "epoch_003.pt": False, "definitive_epoch_1.pt": False}  # fmt: skip
    for name, initial in cases.items():
        from hesd.analysis.checkpoints import parse_epoch

        assert CheckpointInfo(tmp_path / name, parse_epoch(name)).initial is initial, name
