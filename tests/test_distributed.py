"""Data-parallel and task-parallel analysis with gloo, 2 and 3 processes, against one process."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import hesd
from dist_workers import (
    CE,
    algorithms_worker,
    failing_worker,
    fsdp_worker,
    mixed_columns_worker,
    peer_failure_worker,
    series_worker,
    sharded_basis_worker,
    token_worker,
)
from helpers import make_case
from hesd.models import DigitsMLP, load_digits_tensors

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _spawn(fn, world, tmp_path, *args):
    mp.spawn(fn, args=(world, str(tmp_path / "init"), str(tmp_path), *args), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_matches_single_process(world, tmp_path):
    _spawn(algorithms_worker, world, tmp_path)
    model, batches, _ = make_case("cnn", seed=31)
    op = hesd.HessianOperator(model, CE, batches)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = {
        "hv": op @ v,
        "loss": op.loss(),
        "eig": hesd.eigenvalues(op, k=2, which="BE", tol=1e-10).eigenvalues,
        "trace": hesd.trace(op, "hutchpp", num_matvecs=30, seed=2).estimate,
        "slq": hesd.slq(op, num_steps=15, num_probes=2, seed=4),
        "pp": hesd.slq(op, num_steps=15, num_probes=3, seed=4),
    }
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    assert len({r["n_local"] for r in results}) > 1  # shards really are unequal
    for r in results:
        assert r["num_samples"] == 21
        assert (r["hv"] - ref["hv"]).abs().max() < 1e-12
        assert abs(r["loss"] - ref["loss"]) < 1e-14
        assert torch.allclose(r["eig"], ref["eig"], atol=1e-10)
        assert abs(r["trace"] - ref["trace"]) < 1e-9
        for got, want in zip(r["slq"]["values"], ref["slq"].values, strict=True):
            assert np.allclose(got, want, atol=1e-8)
        for got, want in zip(r["probe_parallel"]["values"], ref["pp"].values, strict=True):
            assert np.allclose(got, want, atol=1e-10)
    # Every rank computed bit-identical Lanczos results (same decisions everywhere).
    for r in results[1:]:
        assert r["slq"]["values"] == results[0]["slq"]["values"]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_basis_equals_one_process_and_divides_the_basis(world, tmp_path):
    """Each rank keeps 1/world of every Lanczos vector; Ritz values and weights are one process's to 1e-8.

    So are the trace estimates, Hutch++'s sketch orthonormalised across the ranks.
    """
    _spawn(sharded_basis_worker, world, tmp_path)
    model, batches, _ = make_case("cnn", seed=31)
    op = hesd.HessianOperator(model, CE, batches)
    P = op.shape[0]
    ref = hesd.slq(op, num_steps=15, num_probes=2, seed=4)
    ref_window = hesd.slq(op, num_steps=15, num_probes=1, seed=4, reorth="window", window=4)
    traces = {m: hesd.trace(op, m, num_matvecs=30, seed=2, chunk=4) for m in ("hutchpp", "hutchinson")}
    results = [torch.load(tmp_path / f"sharded_rank{r}.pt", weights_only=False) for r in range(world)]
    covered = sorted(r["rows"] for r in results)
    assert covered[0][0] == 0 and covered[-1][1] == P and all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    assert P % 2 != 0  # with 2 ranks the last block is padded: the case exercises it
    for r in results:
        assert r["block"] == -(-P // world)
        assert r["full"]["dim"] == P
        for key, want in (("full", ref), ("window", ref_window)):
            for got_v, got_w, v, w in zip(r[key]["values"], r[key]["weights"], want.values, want.weights, strict=True):
                assert np.allclose(got_v, v, atol=1e-8) and np.allclose(got_w, w, atol=1e-8), key
        assert r["full"]["info"]["vector_rows"] == -(-P // world)  # each stored Lanczos vector: 1/world of P
        for method, want in traces.items():  # the same probes, drawn whole and cut; Hutch++'s Q across the ranks
            got = r["trace"][method]
            assert abs(got.estimate - want.estimate) < 1e-8 * abs(want.estimate), method
            assert torch.allclose(got.samples, want.samples, rtol=1e-8, atol=1e-10), method
    for r in results[1:]:
        assert r["full"]["values"] == results[0]["full"]["values"]  # identical decisions on every rank


def test_fsdp2_model_by_shard_local_finite_differences(tmp_path):
    """fully_shard on the CPU (gloo): products and SLQ equal one process's exact ones to the error of finite
    differences; each rank holds its shards of every vector; the parameters are restored bit for bit."""
    pytest.importorskip("torch.distributed.fsdp")
    _spawn(fsdp_worker, 2, tmp_path)
    results = [torch.load(tmp_path / f"fsdp_rank{r}.pt", weights_only=False) for r in range(2)]
    assert sum(r["rows"] for r in results) == results[0]["full"]  # the shards tile the parameters
    for r in results:
        assert r["samples"] == 14 and r["restored"]
        assert r["err"] < 1e-8
        assert np.allclose(r["values"], r["ref_values"], rtol=1e-7, atol=1e-9)
        assert np.allclose(r["weights"], r["ref_weights"], atol=1e-7)
        # hesd.eigenvalues on sharded vectors: one process's extremes, and this rank's rows of its eigenvectors
        assert np.allclose(r["ends"], r["ends_ref"], rtol=1e-7) and r["vec_err"] < 1e-5
        assert abs(r["traces"][0] - r["traces"][1]) < 1e-6 * abs(r["traces"][1])  # hesd.trace: Hutch++ sharded
        # hesd.analyze_model on the FSDP2 model: one process's row on all the data
        row, ref = r["row"], r["row_ref"]
        for key in ("lambda_max", "lambda_min", "slq_lambda_max", "trace", "heldout_lambda_max"):
            assert abs(row[key] - ref[key]) <= 1e-6 * abs(ref["lambda_max"]), key
        for key in ("train_loss", "grad_norm", "param_norm", "heldout_loss"):
            assert abs(row[key] - ref[key]) <= 1e-12 * max(abs(ref[key]), 1.0), key
        assert row["num_params"] == ref["num_params"] == r["full"] and row["num_samples"] == 14
        assert row["hesd_type"] == ref["hesd_type"] and abs(row["ct"] - ref["ct"]) < 1e-6
        assert np.isnan(row["sharpness_random"]) and not np.isnan(ref["sharpness_random"])
        assert "sharded by FSDP2" in r["refused"] and "params=['0.weight']" in r["refused"]
    assert results[0]["row"]["lambda_max"] == results[1]["row"]["lambda_max"]  # the same row on every rank


def test_token_level_loss_ranks_weighted_by_their_tokens(tmp_path):
    # Shards of a causal LM's dict batches hold different numbers of label tokens; the ranks'
    # products are weighted by tokens, so every rank gets the single-process Hessian.
    from hf_models import batches, tiny

    _spawn(token_worker, 2, tmp_path)
    model, data = tiny("gpt2"), batches("gpt2", sizes=(2, 3, 4, 1, 3))
    op = hesd.HessianOperator(model, None, data)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    hv = op @ v
    for r in range(2):
        got = torch.load(tmp_path / f"token_rank{r}.pt", weights_only=False)
        assert got["tokens"] == op.num_samples
        assert float((got["hv"] - hv).norm() / hv.norm()) < 1e-12 and abs(got["loss"] - op.loss()) < 1e-13


def test_ranks_with_different_block_widths_sum_correctly(tmp_path):
    # Ranks choose their block width on their own timings. A block's result lies transposed in
    # memory; gloo sums storage as it lies, so before HessianOperator._allreduce made it
    # contiguous these ranks summed unrelated entries (errors of order 1, no exception).
    _spawn(mixed_columns_worker, 2, tmp_path)
    model, batches, _ = make_case("mlp", seed=33)
    op = hesd.HessianOperator(model, CE, batches, batch_columns=1)
    V = torch.randn(op.shape[0], 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    HV = op @ V
    trace = hesd.trace(op, "hutchpp", num_matvecs=30, seed=2).estimate
    for r in range(2):
        got = torch.load(tmp_path / f"mixed_rank{r}.pt", weights_only=False)
        assert (got["HV"] - HV).abs().max() < 1e-12 * HV.abs().max()
        assert abs(got["trace"] - trace) < 1e-9 * abs(trace)


def test_failing_rank_fails_every_rank_quickly(tmp_path):
    t = time.time()
    with pytest.raises(Exception) as err:  # torch.multiprocessing.ProcessRaisedException
        _spawn(failing_worker, 2, tmp_path)
    assert time.time() - t < 60
    msg = str(err.value)
    assert "DistributedError" in msg and "rank 1" in msg and "loss is nan" in msg


@pytest.mark.parametrize("how", ["dies", "stops"])
def test_a_rank_that_dies_or_stops_is_named(how, tmp_path):
    """gloo says "Connection reset by peer" or times out, without a rank; hesd names the rank and what happened."""
    import os
    import signal

    ctx = mp.spawn(peer_failure_worker, args=(2, str(tmp_path / "init"), str(tmp_path), how), nprocs=2, join=False)
    t = time.time()
    ctx.processes[0].join(90)
    elapsed = time.time() - t
    pid = int((tmp_path / "rank1.pid").read_text())
    for p in ctx.processes:  # a stopped rank must be woken to be killed
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            os.kill(p.pid, signal.SIGCONT)
        p.join(30)
    msg = (tmp_path / "explained.txt").read_text()
    assert f"rank 1 (pid {pid})" in msg, msg
    assert ("died" if how == "dies" else "is stopped") in msg, msg
    assert "rerun" in msg and "HESD_DIST_TIMEOUT" in msg
    assert elapsed < 60  # the group's 4 s timeout, not torch's 30 minutes


def test_cli_gives_up_on_a_stopped_rank_after_the_timeout(tmp_path):
    """A SIGSTOPped rank under torchrun: the others stop after HESD_DIST_TIMEOUT with a message naming it."""
    import os
    import subprocess
    import sys
    import textwrap

    from hesd.training import TrainConfig, train_with_checkpoints

    (tmp_path / "m.py").write_text(textwrap.dedent("""
        import os, signal, subprocess, torch
        from hesd.models import DigitsMLP, load_digits_tensors
        def model():
            if os.environ.get("RANK") == "1":  # freeze, woken 40 s later so torchrun can end it
                subprocess.Popen(["sh", "-c", f"sleep 40; kill -CONT {os.getpid()}"], start_new_session=True)
                os.kill(os.getpid(), signal.SIGSTOP)
            return DigitsMLP()
        def data():
            X, y, _, _ = load_digits_tensors()
            return [(X[i:i + 512], y[i:i + 512]) for i in range(0, len(y), 512)]
    """))  # fmt: skip
    X, y, _, _ = load_digits_tensors()
    torch.manual_seed(0)
    train_with_checkpoints(DigitsMLP(), X, y, tmp_path / "ck", TrainConfig(epochs=1, lr=0.05))
    hesd_exe = os.path.join(os.path.dirname(sys.executable), "hesd")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HESD_DIST_TIMEOUT": "5"}
    t = time.time()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--no-python", hesd_exe, "analyze", str(tmp_path / "ck"), "--model",
                          f"{tmp_path / 'm.py'}:model", "--data", f"{tmp_path / 'm.py'}:data", "--steps", "5",
                          "--probes", "1", "--no-landscape", "--no-report", "--out", str(tmp_path / "o"),
                          "--distributed"], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert run.returncode != 0
    assert "rank 1 (pid" in run.stderr and "is stopped" in run.stderr, run.stderr[-3000:]
    assert "HESD_DIST_TIMEOUT=5" in run.stderr
    assert time.time() - t < 120, "gave up after the timeout, not torch's 30 minutes"


@pytest.mark.parametrize("parallel", ["data", "checkpoints"])
def test_series_distributed_equals_single_process(parallel, tmp_path):
    from hesd.training import TrainConfig, train_with_checkpoints

    X, y, _, _ = load_digits_tensors()
    torch.manual_seed(0)
    ckpts = tmp_path / "ckpts"
    train_with_checkpoints(DigitsMLP(), X, y, ckpts, TrainConfig(epochs=2, lr=0.05))
    _spawn(series_worker, 2, tmp_path, str(ckpts), parallel)
    X64, y64, _, _ = load_digits_tensors(dtype=torch.float64)
    batches = [(X64[i : i + 300], y64[i : i + 300]) for i in range(0, len(y64), 300)]
    settings = hesd.AnalysisSettings(num_steps=12, num_probes=2, refine_extremes=False, dtype="float64")
    ref = hesd.analyze_checkpoints(DigitsMLP, ckpts, batches, settings=settings)
    for r in range(2):
        got = torch.load(tmp_path / f"series_rank{r}.pt", weights_only=False)
        assert np.allclose(got["ct"], ref.table["ct"], atol=1e-8)
        assert np.allclose(got["lambda_max"], ref.table["lambda_max"], atol=1e-8)
    from hesd.interfaces.report import load_series

    stored = load_series(tmp_path / "results")
    assert len(stored.table) == 3 and (stored.table["status"] == "ok").all()


def test_more_ranks_than_batches_leaves_a_rank_with_an_empty_shard(tmp_path):
    """Three ranks, two batches: rank 2's shard is empty, which the whole data set is checked for
    only after the counts are summed (before 0.2.0 every checkpoint failed on that rank)."""
    from hesd.training import TrainConfig, train_with_checkpoints

    X, y, _, _ = load_digits_tensors()
    torch.manual_seed(0)
    ckpts = tmp_path / "ckpts"
    train_with_checkpoints(DigitsMLP(), X, y, ckpts, TrainConfig(epochs=1, lr=0.05))
    _spawn(series_worker, 3, tmp_path, str(ckpts), "data", 700)
    X64, y64, _, _ = load_digits_tensors(dtype=torch.float64)
    batches = [(X64[i : i + 700], y64[i : i + 700]) for i in range(0, len(y64), 700)]
    assert len(batches) == 2
    settings = hesd.AnalysisSettings(num_steps=12, num_probes=2, refine_extremes=False, dtype="float64")
    ref = hesd.analyze_checkpoints(DigitsMLP, ckpts, batches, settings=settings)
    assert (ref.table["status"] == "ok").all()
    for r in range(3):
        got = torch.load(tmp_path / f"series_rank{r}.pt", weights_only=False)
        assert np.allclose(got["ct"], ref.table["ct"], atol=1e-8)
        assert np.allclose(got["lambda_max"], ref.table["lambda_max"], atol=1e-8)


def test_cli_under_torchrun(tmp_path):
    import os
    import subprocess
    import sys
    import textwrap

    from hesd.training import TrainConfig, train_with_checkpoints

    (tmp_path / "m.py").write_text(textwrap.dedent("""
        import torch
        from hesd.models import DigitsMLP, load_digits_tensors
        def model():
            return DigitsMLP().double()
        def data():
            X, y, _, _ = load_digits_tensors(dtype=torch.float64)
            return [(X[i:i + 256], y[i:i + 256]) for i in range(0, len(y), 256)]
    """))  # fmt: skip
    X, y, _, _ = load_digits_tensors()
    torch.manual_seed(0)
    train_with_checkpoints(DigitsMLP(), X, y, tmp_path / "ck", TrainConfig(epochs=1, lr=0.05))
    hesd_exe = os.path.join(os.path.dirname(sys.executable), "hesd")
    common = [
        str(tmp_path / "ck"),
        "--model",
        f"{tmp_path / 'm.py'}:model",
        "--data",
        f"{tmp_path / 'm.py'}:data",
        "--steps",
        "10",
        "--probes",
        "2",
        "--quiet",
        "--no-landscape",
        "--no-report",
        "--dtype",
        "float64",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--no-python", hesd_exe, "analyze", *common, "--out", str(tmp_path / "dist"),
                          "--distributed"], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    single = subprocess.run([hesd_exe, "analyze", *common, "--out", str(tmp_path / "single")], capture_output=True,
                            text=True, timeout=300, env=env)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    import pandas as pd

    a = pd.read_csv(tmp_path / "dist" / "results.csv")
    b = pd.read_csv(tmp_path / "single" / "results.csv")
    assert np.allclose(a["ct"], b["ct"], atol=1e-8) and np.allclose(a["lambda_max"], b["lambda_max"], rtol=1e-8)
    ckpt = str(tmp_path / "ck" / "epoch_001.pt")
    spec_args = [ckpt, "--model", f"{tmp_path / 'm.py'}:model", "--data", f"{tmp_path / 'm.py'}:data", "--steps", "10",
                 "--probes", "2", "--json"]  # fmt: skip
    dist_spec = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                "--no-python", hesd_exe, "spectrum", *spec_args, "--distributed"], capture_output=True,
                               text=True, timeout=300, env=env)  # fmt: skip
    assert dist_spec.returncode == 0, dist_spec.stderr[-3000:]
    one = subprocess.run([hesd_exe, "spectrum", *spec_args], capture_output=True, text=True, timeout=300, env=env)
    import json

    d1, d2 = json.loads(dist_spec.stdout), json.loads(one.stdout)  # only rank 0 printed
    assert abs(d1["ct"] - d2["ct"]) < 1e-8 and abs(d1["lambda_max"] - d2["lambda_max"]) < 1e-8 * d2["lambda_max"]


@pytest.mark.parametrize("family", ["mlp", "gpt2"])
def test_fsdp2_one_rank_against_dense_hessian(tmp_path, family):
    """FSDP2 over a one-rank gloo mesh (in this process) against the dense float64 Hessian. The tiny
    GPT-2 (its own loss) caught FSDPHessianOperator running outside hesd's forward state, where
    ``transformers`` computed a float64 model's loss in float32 (products off by 1e-3)."""
    pytest.importorskip("torch.distributed.fsdp")
    from fsdp_cases import check_single_rank_fsdp

    check_single_rank_fsdp(family, "cpu", "gloo", tmp_path)
