"""The peers' runs for benchmarks/scale.py: hessian-eigenthings 1.0, PyHessian, curvlinops (each in its own process)."""

from __future__ import annotations

import sys
from pathlib import Path

import scale
import torch
import torch.nn.functional as F
from scale import STEPS, Logits, build, phase
from torch import nn


def run_eigenthings(size: str, a) -> dict:
    import hessian_eigenthings as he

    model, batch = build(size, eager=True)
    r: dict = {}
    params = list(model.parameters())
    with phase("gradient", r, "grad s"):
        torch.autograd.grad(model(**batch).loss, params)
    op = he.HessianOperator(model, [batch], he.hf_lm_loss())
    fd = he.HessianOperator(model, [batch], he.hf_lm_loss(), method="finite_difference")
    v = torch.randn(op.size, device=scale.DEVICE)
    with phase("product", r, "HVP s"):
        op.matvec(v)
    with phase("finite-difference product", r, "FD s"):
        fd.matvec(v)
    with phase("top-1", r, "top-1 s"):
        res = he.lanczos(op, k=1, max_iter=20, which="LA", tol=1e-3, seed=0)
    r["top-1 HVPs"], r["top-1"] = 20, float(res.eigenvalues[0])
    with phase("SLQ", r, "SLQ s"):
        he.spectral_density(op, num_runs=1, lanczos_steps=STEPS, seed=0)
    return r


def run_pyhessian(size: str, a) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare import _shim_torch_eig

    _shim_torch_eig()
    import pyhessian  # noqa: F401

    ph = sys.modules["pyhessian.hessian"]
    lm, batch = build(size, eager=True)
    model = Logits(lm)
    ids = batch["input_ids"]
    y = ids[:, 1:].reshape(-1)
    r: dict = {}
    with phase("set-up (forward, gradient with create_graph)", r, "grad s"):
        comp = ph.hessian(model, F.cross_entropy, data=(ids, y), cuda=scale.DEVICE.type == "cuda")
    vv = [torch.randn_like(p) for p in comp.params]
    with phase("product", r, "HVP s"):
        ph.hessian_vector_product(comp.gradsH, comp.params, vv)
    calls = [0]
    orig = ph.hessian_vector_product

    def counted(*x, **k):
        calls[0] += 1
        return orig(*x, **k)

    ph.hessian_vector_product = counted
    with phase("top-1", r, "top-1 s"):
        vals = comp.eigenvalues(top_n=1, tol=1e-3, maxIter=100)[0]
    r["top-1 HVPs"], r["top-1"] = calls[0], float(vals[0])
    with phase("SLQ", r, "SLQ s"):
        comp.density(iter=STEPS, n_v=1)
    return r


def run_curvlinops(size: str, a) -> dict:
    import curvlinops
    from scipy.sparse.linalg import eigsh

    lm, batch = build(size, eager=True)
    model = Logits(lm)
    ids = batch["input_ids"]
    y = ids[:, 1:].reshape(-1)
    params = [p for p in model.parameters() if p.requires_grad]
    r: dict = {}
    op = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(ids, y)])
    v = torch.randn(sum(p.numel() for p in params), device=scale.DEVICE)
    with phase("product", r, "HVP s"):
        op @ v
    calls = [0]
    orig = op._matmat

    def counted(M):
        first = M[0] if isinstance(M, (list, tuple)) else M
        calls[0] += first.shape[-1]
        return orig(M)

    op._matmat = counted
    with phase("top-1", r, "top-1 s"):
        vals = eigsh(op.to_scipy(), k=1, which="LA", tol=1e-3, return_eigenvectors=False)
    r["top-1 HVPs"], r["top-1"] = calls[0], float(vals[0])
    return r
