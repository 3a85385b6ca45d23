"""Real Trainer runs and checkpoint folders: the callback, and `hesd analyze` with no glue.

One tiny character-level GPT-2 is trained once per module with transformers' Trainer (the demo's
trainer, few steps), saving checkpoint-* folders with optimizer.pt, scheduler.pt, rng_state.pth,
training_args.bin and the tokenizer; the callback rides along.
"""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import hesd
from hesd.analysis.hf_checkpoints import MissingExtraError, hf_checkpoint_kind, load_hf_checkpoint, require
from hesd.interfaces.cli import app
from hesd.interfaces.demo_lm import byte_tokenizer, train_tiny_gpt
from hesd.interfaces.hf_data import lm_batches, text_batches

FAST = hesd.AnalysisSettings(num_steps=8, num_probes=1, refine_extremes=False)
ARGS = ["--steps", "8", "--probes", "1", "--max-samples", "4", "--max-length", "32", "--no-landscape", "--json"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    tok = byte_tokenizer()
    data = lm_batches(tok, ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n"], max_length=32)
    cb = hesd.HesdTrainerCallback(data, out / "monitor", settings=FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the callback must not warn on a healthy run
        trainer_dir = train_tiny_gpt(out, steps=25, save_steps=10, length=32, callbacks=[cb])
    return out, trainer_dir


def test_callback_rows_by_step_tied_weights_saved_and_report(run):
    out, _ = run
    t = pd.read_csv(out / "monitor" / "results.csv")
    # saved at 10 and 20, then the final state at 25: a run ending mid-epoch keeps every row
    assert t["epoch"].tolist() == [10, 20, 25] and (t["status"] == "ok").all()
    files = sorted(p.name for p in (out / "monitor" / "checkpoints").iterdir())
    assert files == ["step_0000010.safetensors", "step_0000020.safetensors", "step_0000025.safetensors"]
    assert (out / "monitor" / "report.html").is_file()


def test_callback_never_ends_training(tmp_path):
    cb = hesd.HesdTrainerCallback([("not", "a batch")], tmp_path / "bad", every_n_steps=5, settings=FAST)
    with pytest.warns(RuntimeWarning, match="training goes on"):
        train_tiny_gpt(tmp_path, steps=10, save_steps=100, length=32, callbacks=[cb])
    assert (tmp_path / "trainer").is_dir()


def test_analyze_trainer_folders_with_a_text_file(run, tmp_path):
    out, trainer_dir = run
    folders = sorted(str(p) for p in trainer_dir.glob("checkpoint-*"))
    assert all(hf_checkpoint_kind(f) == "model" for f in folders)
    assert (trainer_dir / "checkpoint-10" / "optimizer.pt").is_file()  # Trainer's other files are there
    res = CliRunner().invoke(app, ["analyze", *folders, "--data", str(out / "train.txt"), "--heldout",
                                   str(out / "heldout.txt"), "--out", str(tmp_path / "r"), *ARGS])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["results"]
    assert [r["epoch"] for r in rows] == [10, 20, 25] and all(r["status"] == "ok" for r in rows)
    states = [json.loads((trainer_dir / f"checkpoint-{s}" / "trainer_state.json").read_text()) for s in (10, 20, 25)]
    assert [r["train_epoch"] for r in rows] == [st["epoch"] for st in states]
    assert all(r["heldout_loss"] > 0 for r in rows)
    assert json.loads(res.stdout)["selections"]["best_heldout"]["checkpoint"]
    # train_loss is the model's own token-level loss over the text, checked independently
    model = load_hf_checkpoint(trainer_dir / "checkpoint-20").eval()
    batches = text_batches(str(out / "train.txt"), trainer_dir / "checkpoint-20", max_length=32, max_samples=4)
    with torch.no_grad():
        total = sum(float(model(**b).loss) * int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert rows[1]["train_loss"] == pytest.approx(total / count, rel=1e-5)
    assert rows[1]["num_samples"] == count
    # the output folder itself (Trainer's output_dir) finds the same three checkpoints
    again = CliRunner().invoke(app, ["analyze", str(trainer_dir), "--data", str(out / "train.txt"),
                                     "--out", str(tmp_path / "r2"), *ARGS])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert [r["epoch"] for r in json.loads(again.stdout)["results"]] == [10, 20, 25]


def test_analyze_jsonl_and_datasets_folder(run, tmp_path):
    _, trainer_dir = run
    texts = ["def g(a, b):\n    return a * b\n", "x = [i for i in range(3)]\n", "class A:\n    pass\n"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"content": t}) for t in texts))
    import datasets

    datasets.Dataset.from_dict({"content": texts}).save_to_disk(str(tmp_path / "ds"))
    results = []
    for spec in (jsonl, tmp_path / "ds"):
        args = ["--data", str(spec), "--text-field", "content", "--out", str(tmp_path / f"r-{spec.name}"), *ARGS]
        res = CliRunner().invoke(app, ["analyze", str(trainer_dir / "checkpoint-20"), *args])
        assert res.exit_code == 0, res.output
        results.append(json.loads(res.stdout)["results"][0])
    assert results[0]["train_loss"] == pytest.approx(results[1]["train_loss"], rel=1e-9)
    bad = CliRunner().invoke(app, ["analyze", str(trainer_dir / "checkpoint-20"), "--data", str(jsonl),
                                   "--out", str(tmp_path / "bad"), *ARGS])  # fmt: skip
    assert bad.exit_code == 2 and "--text-field" in bad.output


@pytest.fixture(scope="module")
def adapter(run, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    _, trainer_dir = run
    root = tmp_path_factory.mktemp("adapter")
    base = load_hf_checkpoint(trainer_dir / "checkpoint-20")
    base.save_pretrained(root / "base", max_shard_size="50KB")  # sharded: model.safetensors.index.json
    byte_tokenizer().save_pretrained(root / "base")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                 task_type="CAUSAL_LM"))  # fmt: skip
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(root / "adapter-1")
    cfg = json.loads((root / "adapter-1" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(root / "base")
    (root / "adapter-1" / "adapter_config.json").write_text(json.dumps(cfg))
    n_lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    return root, n_lora


def test_analyze_a_lora_adapter_over_its_parameters_only(run, adapter, tmp_path):
    out, _ = run
    root, n_lora = adapter
    assert (root / "base" / "model.safetensors.index.json").is_file()
    assert hf_checkpoint_kind(root / "adapter-1") == "adapter"
    res = CliRunner().invoke(app, ["analyze", str(root / "adapter-1"), "--data", str(out / "train.txt"),
                                   "--out", str(tmp_path / "r"), *ARGS])  # fmt: skip
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["results"][0]
    assert row["status"] == "ok" and row["num_params"] == n_lora


def test_an_adapter_without_its_base_model_stops_up_front(run, adapter, tmp_path):
    out, _ = run
    root, _ = adapter
    lost = tmp_path / "adapter-lost"
    lost.mkdir()
    for f in (root / "adapter-1").iterdir():
        (lost / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((lost / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some-org/some-model"
    (lost / "adapter_config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["analyze", str(lost), "--data", str(out / "train.txt"), "--out",
                                   str(tmp_path / "r"), *ARGS])  # fmt: skip
    assert res.exit_code == 2 and "some-org/some-model" in res.output and "--model" in res.output


def test_a_missing_extra_names_the_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'hesd\[transformers\]'"):
        require("peft")


def test_each_folder_is_loaded_once(run, monkeypatch):
    """The up-front check loads the first folder; the series uses that model instead of loading it again."""
    import hesd.analysis.series as series

    _, trainer_dir = run
    folders = sorted(trainer_dir.glob("checkpoint-*"))
    calls = []

    def counting(path, *a, **kw):
        calls.append(str(path))
        return load_hf_checkpoint(path, *a, **kw)

    monkeypatch.setattr(series, "load_hf_checkpoint", counting)
    data = lm_batches(byte_tokenizer(), ["def g(y):\n    return y * 2\n"], max_length=32)
    res = hesd.analyze_checkpoints(None, folders, data, loss_fn=None, settings=FAST)
    assert (res.table["status"] == "ok").all() and sorted(calls) == sorted(map(str, folders))
