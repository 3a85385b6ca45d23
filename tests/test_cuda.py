"""On a GPU: products, batched columns, lockstep SLQ, NCCL and mixed precision against the CPU in float64.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hesd
from conformance_cases import CASES, build
from helpers import make_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CE = torch.nn.functional.cross_entropy
CUDA = torch.device("cuda")


def _on_cuda(batches):
    return [(X.to(CUDA), y.to(CUDA)) for X, y in batches]


@pytest.mark.parametrize("method", ["auto", "graph", "double_backward", "func"])
def test_cuda_products_match_cpu_dense_hessian(case, method):
    name, model, batches, _ = case
    H = hesd.exact_hessian(model, CE, batches)
    op = hesd.HessianOperator(model.to(CUDA), CE, _on_cuda(batches), hvp_method=method)
    assert op.batch_columns == 8  # the GPU default
    V = torch.randn(H.shape[0], 11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    HV = (op @ V.to(CUDA)).cpu()  # one block of 8 and one of 3
    assert (HV - H @ V).abs().max() < 1e-10 * max(1.0, float(H.abs().max())), (name, method)
    v = V[:, 0]
    assert ((op @ v.to(CUDA)).cpu() - H @ v).abs().max() < 1e-10 * max(1.0, float(H.abs().max()))


@pytest.mark.parametrize("method", ["auto", "graph", "double_backward", "func"])
@pytest.mark.parametrize("family", CASES, ids=lambda c: c.name)
def test_cuda_conformance_matrix(family, method):
    """Every layer family of tests/operators/test_conformance.py on the GPU, blocks of 8 by default:
    GroupNorm's batched fallback, recurrent layers off cuDNN (whose RNN backward refuses eval
    mode), attention on the math kernel; against the CPU's dense float64 Hessian."""
    if method == "func" and family.model_mode == "train":
        pytest.skip("hesd refuses func in train mode (tested on the CPU)")
    model, batches = build(family)
    H = hesd.exact_hessian(model, family.loss, batches, model_mode=family.model_mode)
    gpu = [(X.to(CUDA), y.to(CUDA)) for X, y in batches]
    op = hesd.HessianOperator(model.to(CUDA), family.loss, gpu, hvp_method=method, model_mode=family.model_mode)
    if method == "func" and any(isinstance(m, torch.nn.RNNBase) for m in model.modules()):
        # off cuDNN, PyTorch's CUDA recurrent cells are fused kernels without a forward-mode derivative
        fused = r"no forward-mode derivative for _thnn_fused_(gru|lstm)_cell"
        with pytest.raises(hesd.UnsupportedModelError, match=fused):
            op @ torch.randn(H.shape[0], dtype=torch.float64, device=CUDA)
        return
    V = torch.randn(H.shape[0], 11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    HV = (op @ V.to(CUDA)).cpu()
    assert (HV - H @ V).abs().max() < 1e-10 * max(1.0, float(H.abs().max())), (family.name, method)
    assert torch.backends.cudnn.enabled  # restored after products


def test_cuda_lockstep_slq_and_eigenvalues_match_cpu():
    model, batches, _ = make_case("cnn", seed=41)
    cpu = hesd.HessianOperator(model, CE, batches)
    ref = hesd.slq(cpu, num_steps=20, num_probes=5, seed=1)
    ref_eig = hesd.eigenvalues(cpu, k=3, which="BE", tol=1e-10).eigenvalues
    gpu = hesd.HessianOperator(model.to(CUDA), CE, _on_cuda(batches))
    got = hesd.slq(gpu, num_steps=20, num_probes=5, seed=1)  # 5 probes in lockstep, batched products
    assert got.info["lockstep"] == 8
    for a, b in zip(ref.values, got.values, strict=True):
        assert np.allclose(a, b, atol=1e-9)
    assert torch.allclose(hesd.eigenvalues(gpu, k=3, which="BE", tol=1e-10).eigenvalues.cpu(), ref_eig, atol=1e-9)


def test_cuda_nccl_single_process_group(tmp_path):
    """The data-parallel code path with the NCCL backend (one GPU: a world of one)."""
    import torch.distributed as dist

    model, batches, _ = make_case("mlp", seed=42)
    ref = hesd.HessianOperator(model, CE, batches)
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = ref @ v
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        op = hesd.HessianOperator(model.to(CUDA), CE, _on_cuda(batches), distributed=True)
        assert ((op @ v.to(CUDA)).cpu() - want).abs().max() < 1e-12
        assert op.num_samples == 21
    finally:
        dist.destroy_process_group()


def test_cuda_bfloat16_autocast_error_against_float64():
    model, batches, _ = make_case("attention", seed=43)
    H = hesd.exact_hessian(model, CE, batches)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0))
    ref = (H @ v.double()).float()
    m32 = model.float().to(CUDA)
    b32 = [(X.float().to(CUDA), y.to(CUDA)) for X, y in batches]
    exact = (hesd.HessianOperator(m32, CE, b32) @ v.to(CUDA)).cpu()
    mixed = (hesd.HessianOperator(m32, CE, b32, autocast_dtype=torch.bfloat16) @ v.to(CUDA)).cpu()
    assert float((exact - ref).norm() / ref.norm()) < 1e-4  # TF32 may be on for float32 matmuls
    assert float((mixed - ref).norm() / ref.norm()) < 0.1


def test_cuda_analyze_model_with_cpu_data():
    """A model on the GPU with batches on the CPU: hesd moves each batch; the row equals the CPU one."""
    model, batches, _ = make_case("cnn", seed=44)
    settings = hesd.AnalysisSettings(num_steps=15, num_probes=3)
    cpu_row, _ = hesd.analyze_model(model, batches, loss_fn=CE, settings=settings)
    row, _ = hesd.analyze_model(model.to(CUDA), batches, loss_fn=CE, settings=settings)
    assert abs(row["ct"] - cpu_row["ct"]) < 1e-8 and row["hesd_type"] == cpu_row["hesd_type"]


def test_cuda_tf32_off_inside_products_and_restored():
    """On a GPU, cuDNN's TF32 flag (on by default) is off during products and restored after."""
    seen = []
    model, batches, _ = make_case("cnn", seed=43)
    model = model.float().to(CUDA)

    def record(module, args):
        seen.append((torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()))

    model.register_forward_pre_hook(record)
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        data = [(X.float().to(CUDA), y.to(CUDA)) for X, y in batches]
        op = hesd.HessianOperator(model, CE, data, hvp_method="double_backward")
        op @ torch.randn(op.shape[0], device=CUDA)
        assert seen and all(s == (False, "highest") for s in seen)
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("family", ["mlp", "gpt2"])
def test_cuda_fsdp2_single_gpu_against_cpu_dense_hessian(tmp_path, family):
    """FSDP2 over a one-GPU NCCL mesh against the CPU's dense float64 Hessian (tests/fsdp_cases.py)."""
    from fsdp_cases import check_single_rank_fsdp

    check_single_rank_fsdp(family, "cuda", "nccl", tmp_path)
