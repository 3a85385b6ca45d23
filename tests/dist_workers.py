"""Worker functions for the torch.distributed tests (module-level, so spawn can import them)."""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import hesd
from helpers import make_case
from hesd.distributed import shard, slq_probe_parallel

CE = torch.nn.functional.cross_entropy


def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # fmt: skip


def _teardown() -> None:
    """Wait for every rank, then tear the group down; after a failure, tear down at once.

    A rank that destroyed its group while its peer was still finishing its last collective aborted the
    peer once ("terminate called without an active exception", SIGABRT, in
    ``test_token_level_loss_ranks_weighted_by_their_tokens``): the barrier makes both ranks reach the
    teardown together. A rank whose work raised does not wait (its peer may be the one that failed).
    """
    if sys.exc_info()[0] is None:
        dist.barrier()
    dist.destroy_process_group()


def algorithms_worker(rank: int, world: int, init_file: str, out: str) -> None:
    _init(rank, world, init_file)
    try:
        model, batches, _ = make_case("cnn", seed=31)
        local = shard(batches)  # round-robin by batch: unequal shards (8+5 vs 8 samples, or 8/8/5)
        op = hesd.HessianOperator(model, CE, local, process_group=True)
        v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        res = {
            "n_local": sum(len(y) for _, y in local),
            "num_samples": op.num_samples,
            "hv": op @ v,
            "loss": op.loss(),
            "eig": hesd.eigenvalues(op, k=2, which="BE", tol=1e-10).eigenvalues,
            "trace": hesd.trace(op, "hutchpp", num_matvecs=30, seed=2).estimate,
            "slq": hesd.slq(op, num_steps=15, num_probes=2, seed=4).to_dict(),
        }
        full_op = hesd.HessianOperator(model, CE, batches)  # every rank holds all the data
        res["probe_parallel"] = slq_probe_parallel(full_op, 15, 3, seed=4).to_dict()
        torch.save(res, f"{out}/rank{rank}.pt")
    finally:
        _teardown()


def mixed_columns_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Ranks with different block widths: rank 0 multiplies 8 columns per pass (its result is
    the transpose of a ``(k, P)`` tensor), the others one column per pass (contiguous)."""
    _init(rank, world, init_file)
    try:
        model, batches, _ = make_case("mlp", seed=33)
        op = hesd.HessianOperator(model, CE, shard(batches), process_group=True,
                                  batch_columns=8 if rank == 0 else 1)  # fmt: skip
        V = torch.randn(op.shape[0], 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        torch.save({"HV": op @ V, "trace": hesd.trace(op, "hutchpp", num_matvecs=30, seed=2).estimate},
                   f"{out}/mixed_rank{rank}.pt")  # fmt: skip
    finally:
        _teardown()


def failing_worker(rank: int, world: int, init_file: str, out: str) -> None:
    _init(rank, world, init_file)
    try:
        model, batches, _ = make_case("mlp", seed=32)
        local = shard(batches)
        if rank == 1:
            X, y = local[0]
            X = X.clone()
            X[0, 0] = float("nan")
            local = [(X, y), *local[1:]]
        op = hesd.HessianOperator(model, CE, local, process_group=True)
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    finally:
        _teardown()


def series_worker(
    rank: int, world: int, init_file: str, out: str, ckpt_dir: str, parallel: str, batch: int = 300
) -> None:
    _init(rank, world, init_file)
    try:
        from hesd.models import DigitsMLP, load_digits_tensors

        X, y, _, _ = load_digits_tensors(dtype=torch.float64)
        batches = [(X[i : i + batch], y[i : i + batch]) for i in range(0, len(y), batch)]
        data = shard(batches) if parallel == "data" else batches
        settings = hesd.AnalysisSettings(num_steps=12, num_probes=2, refine_extremes=False, dtype="float64")
        res = hesd.analyze_checkpoints(DigitsMLP, ckpt_dir, data, out_dir=f"{out}/results", settings=settings,
                                       process_group=True, parallel=parallel)  # fmt: skip
        torch.save({"ct": res.table["ct"].tolist(), "lambda_max": res.table["lambda_max"].tolist()},
                   f"{out}/series_rank{rank}.pt")  # fmt: skip
    finally:
        _teardown()


def token_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """A causal LM's own loss on dict batches with unequal token counts, sharded over the ranks."""
    from hf_models import batches, tiny

    _init(rank, world, init_file)
    try:
        model, data = tiny("gpt2"), batches("gpt2", sizes=(2, 3, 4, 1, 3))
        op = hesd.HessianOperator(model, None, shard(data), process_group=True)
        v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        torch.save({"hv": op @ v, "loss": op.loss(), "tokens": op.num_samples}, f"{out}/token_rank{rank}.pt")
    finally:
        _teardown()


def sharded_basis_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """SLQ on vectors split across the ranks (ShardedOperator), full and windowed re-orthogonalisation."""
    from hesd.operators.sharded import ShardedOperator

    _init(rank, world, init_file)
    try:
        model, batches, _ = make_case("cnn", seed=31)
        op = hesd.HessianOperator(model, CE, shard(batches), process_group=True)
        sharded = ShardedOperator(op)
        res = {
            "rows": (sharded.rows.start, sharded.rows.stop),
            "block": sharded.shape[0],
            "full": hesd.slq(sharded, num_steps=15, num_probes=2, seed=4).to_dict(),
            "window": hesd.slq(sharded, num_steps=15, num_probes=1, seed=4, reorth="window", window=4).to_dict(),
            "trace": {m: hesd.trace(sharded, m, num_matvecs=30, seed=2, chunk=4) for m in ("hutchpp", "hutchinson")},
        }
        torch.save(res, f"{out}/sharded_rank{rank}.pt")
    finally:
        _teardown()


def fsdp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """FSDP2 (fully_shard on gloo, CPU): finite-difference products and SLQ against one process's exact ones."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fsdp_cases import mlp_case
    from hesd.operators.fsdp import FSDPHessianOperator

    _init(rank, world, init_file)
    try:
        model, batches = mlp_case((5, 3, 4, 2))
        unsharded = copy.deepcopy(model)
        exact = hesd.HessianOperator(unsharded, CE, batches)  # one process, all the data
        mesh = init_device_mesh("cpu", (world,))
        for m in model:
            if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        op = FSDPHessianOperator(model, CE, batches[rank::world])
        before = [t.clone() for t in op.locals]
        V = torch.randn(exact.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        HV = op @ op.local_rows(V)
        ref = op.local_rows(exact @ V)
        spec = hesd.slq(op, num_steps=12, num_probes=1, seed=4)
        spec_ref = hesd.slq(exact, num_steps=12, num_probes=1, seed=4)
        ends = hesd.eigenvalues(op, k=2, which="BE", tol=1e-9, return_eigenvectors=True)  # vectors sharded
        ends_ref = hesd.eigenvalues(exact, k=2, which="BE", tol=1e-9, return_eigenvectors=True)
        traces = [hesd.trace(o, "hutchpp", num_matvecs=12, seed=2).estimate for o in (op, exact)]  # Q sharded
        # hesd.analyze_model on the sharded model: the same row as one process on all the data
        settings = hesd.AnalysisSettings(num_steps=12, num_probes=2, seed=3, heldout_criteria=True)
        row, _ = hesd.analyze_model(model, batches[rank::world], loss_fn=CE, heldout=batches[:2], settings=settings)
        row_ref, _ = hesd.analyze_model(unsharded, batches, loss_fn=CE, heldout=batches[:2], settings=settings)
        try:
            hesd.analyze_model(model, batches[rank::world], loss_fn=CE,
                               settings=hesd.AnalysisSettings(num_steps=5, params=["0.weight"]))  # fmt: skip
            refused = ""
        except hesd.HesdValueError as exc:
            refused = str(exc)
        torch.save({"ends": ends.eigenvalues.tolist(), "ends_ref": ends_ref.eigenvalues.tolist(),
                    "vec_err": float(min((ends.eigenvectors[:, 1] - s * op.local_rows(ends_ref.eigenvectors)[:, 1])
                                         .norm() for s in (1, -1))),
                    "row": row, "row_ref": row_ref, "refused": refused, "traces": traces,
                    "err": float((HV - ref).norm() / ref.norm()), "rows": op.shape[0], "full": op.full_dim,
                    "restored": all(torch.equal(a, b) for a, b in zip(before, op.locals, strict=True)),
                    "values": spec.values[0].tolist(), "ref_values": spec_ref.values[0].tolist(),
                    "weights": spec.weights[0].tolist(), "ref_weights": spec_ref.weights[0].tolist(),
                    "samples": op.num_samples}, f"{out}/fsdp_rank{rank}.pt")  # fmt: skip
    finally:
        _teardown()


def peer_failure_worker(rank: int, world: int, init_file: str, out: str, how: str) -> None:
    """Rank 1 dies (``os._exit``) or stops itself (SIGSTOP) while rank 0 waits in an all-reduce;
    rank 0 writes what :func:`hesd.distributed.explain_failure` makes of the collective's error."""
    import os
    import signal
    from pathlib import Path

    from hesd.distributed import explain_failure, note_peers

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=4))  # fmt: skip
    note_peers()
    if rank == 1:
        Path(out, "rank1.pid").write_text(str(os.getpid()))
        if how == "dies":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    try:
        t = torch.ones(4)
        dist.all_reduce(t)
        dist.all_reduce(t)
        Path(out, "explained.txt").write_text("no error")
    except RuntimeError as exc:
        Path(out, "explained.txt").write_text(explain_failure(exc) or f"not explained: {exc}")
    os._exit(0)  # no teardown with a missing peer
