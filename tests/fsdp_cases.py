"""FSDP2 on a world of one rank against the dense float64 Hessian: shared by the CPU (gloo) and GPU (NCCL) tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

import hesd


def mlp_case(sizes: tuple[int, ...]) -> tuple[torch.nn.Sequential, list]:
    """A float64 Linear–tanh–LayerNorm–Linear classifier (seeded) and batches of ``sizes`` rows (cross-entropy)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.LayerNorm(10),
                                torch.nn.Linear(10, 3)).double()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
               for n in sizes]  # fmt: skip
    return model, batches


def check_single_rank_fsdp(family: str, device: str, backend: str, tmp_path: Path) -> None:
    """``fully_shard`` over a one-rank mesh on ``device``: shard-local finite-difference products,
    eigenvalues and ``analyze_model`` against the dense float64 Hessian computed on the CPU.

    ``family``: ``"gpt2"`` (a tiny GPT-2 with its own token-level loss, dict batches with padding
    and ``-100`` labels) or ``"mlp"`` (Linear, tanh, LayerNorm, Linear with cross-entropy).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hesd.operators.fsdp import FSDPHessianOperator

    if family == "gpt2":
        from hf_models import batches as hf_batches
        from hf_models import tiny

        model, loss_fn, batches = tiny("gpt2"), None, hf_batches("gpt2")
        blocks = list(model.transformer.h)
    else:
        model, batches = mlp_case((5, 3, 4))
        loss_fn, blocks = F.cross_entropy, [model[0], model[3]]
    H = hesd.exact_hessian(copy.deepcopy(model), loss_fn, batches)
    settings = hesd.AnalysisSettings(num_steps=12, num_probes=2, seed=3)
    row_ref, _ = hesd.analyze_model(copy.deepcopy(model), batches, loss_fn=loss_fn, settings=settings)
    dev = torch.device(device)

    def moved(b):
        return {k: t.to(dev) for k, t in b.items()} if isinstance(b, dict) else tuple(t.to(dev) for t in b)

    data = [moved(b) for b in batches]
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = model.to(dev)
        mesh = init_device_mesh(device, (1,))
        for m in blocks:
            fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        op = FSDPHessianOperator(model, loss_fn, data)
        assert op.full_dim == H.shape[0]
        V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        HV = (op @ op.local_rows(V.to(dev))).cpu()
        ref = H @ V
        assert float((HV - ref).norm() / ref.norm()) < 1e-7, family
        ends = hesd.eigenvalues(op, k=2, which="BE", tol=1e-9).eigenvalues.cpu().sort().values
        want = torch.linalg.eigvalsh(H)[[0, -1]]
        assert torch.allclose(ends, want, rtol=1e-6, atol=1e-9), (ends, want)
        row, _ = hesd.analyze_model(model, data, loss_fn=loss_fn, settings=settings)
        for key in ("lambda_max", "lambda_min", "slq_lambda_max", "trace"):
            assert abs(row[key] - row_ref[key]) <= 1e-6 * abs(row_ref["lambda_max"]), key
        assert abs(row["train_loss"] - row_ref["train_loss"]) <= 1e-12 * max(1.0, abs(row_ref["train_loss"]))
        assert row["hesd_type"] == row_ref["hesd_type"] and abs(row["ct"] - row_ref["ct"]) < 1e-6
    finally:
        dist.destroy_process_group()
