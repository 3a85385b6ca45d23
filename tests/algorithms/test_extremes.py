"""``hesd.eigenvalues(reorth="window")``: the extreme value at each end by Lanczos over three vectors."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import hesd
from helpers import random_symmetric

lz = importlib.import_module("hesd.algorithms.lanczos")
basis = importlib.import_module("hesd.algorithms.basis")
eigen = importlib.import_module("hesd.algorithms.eigen")


def _indefinite(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    eigs = torch.cat([torch.linspace(-3, 10, n - 3, dtype=torch.float64), torch.tensor([-7.0, 25.0, 40.0])])
    return random_symmetric(n, eigs[torch.randperm(n, generator=g)], seed), torch.sort(eigs).values


@pytest.mark.parametrize(("which", "k", "expected"), [("LA", 1, [40.0]), ("SA", 1, [-7.0]), ("LM", 1, [40.0]),
                                                       ("BE", 2, [-7.0, 40.0])])  # fmt: skip
def test_the_window_finds_the_extremes_the_restarted_method_finds(which, k, expected):
    A, _ = _indefinite(seed=k)
    window = hesd.eigenvalues(A, k=k, which=which, tol=1e-10, seed=3, reorth="window")
    full = hesd.eigenvalues(A, k=k, which=which, tol=1e-10, seed=3)
    assert window.converged and window.eigenvectors is None
    assert window.info == {"restarts": 0, "basis_size": 3}
    exact = torch.tensor(expected, dtype=torch.float64)
    assert torch.allclose(window.eigenvalues, exact, rtol=0, atol=1e-8)
    assert torch.allclose(window.eigenvalues, full.eigenvalues, rtol=0, atol=1e-8)
    # the residual bound holds: an eigenvalue lies within each residual norm (Weyl)
    assert ((window.eigenvalues - exact).abs() <= window.residuals + 1e-12).all()
    assert (window.residuals <= 1e-10 * 40).all()


def test_the_window_is_right_where_its_recurrence_has_copies_of_a_converged_value():
    """λmax separated, λmin inside a dense cluster: λmax converges within a few steps and, without a full basis,
    comes back as spurious copies while λmin still converges; both ends are found to the tolerance."""
    n = 2000
    eigs = torch.cat([torch.linspace(-1, 1, n - 1, dtype=torch.float64), torch.tensor([9.0])])
    A = random_symmetric(n, eigs, seed=11)
    res = hesd.eigenvalues(A, k=2, which="BE", tol=1e-7, seed=1, reorth="window", start_hint=False)
    assert res.converged and res.num_matvecs > 60
    assert abs(float(res.eigenvalues[1]) - 9.0) < 1e-10
    assert abs(float(res.eigenvalues[0]) + 1.0) <= float(res.residuals[0]) + 1e-12
    # the same recurrence, run alone for as many steps, holds copies of λmax
    v0 = hesd.algorithms.probes.gaussian(n, 1, torch.float64, torch.device("cpu"))
    r = hesd.algorithms.lanczos(A, v0, res.num_matvecs, reorth="window", window=3)
    theta = np.linalg.eigvalsh(np.diag(r.alpha) + np.diag(r.beta, 1) + np.diag(r.beta, -1))
    assert int((np.abs(theta - 9.0) < 1e-6).sum()) > 1


def test_the_window_holds_three_vectors_and_no_restart_basis(monkeypatch):
    shapes: list[tuple[int, ...]] = []
    for module in (basis, eigen):
        real = module.basis_buffer
        monkeypatch.setattr(module, "basis_buffer", lambda shape, *a, real=real, **kw: shapes.append(shape)
                            or real(shape, *a, **kw))  # fmt: skip
    A, _ = _indefinite()
    hesd.eigenvalues(A, k=1, tol=1e-8, reorth="window")
    assert shapes == [(1, 3, 300)]


def test_the_window_on_a_float32_hessian_matches_the_restarted_method(case):
    name, model, batches, _ = case
    op = hesd.HessianOperator(model, torch.nn.functional.cross_entropy, batches)
    full = hesd.eigenvalues(op, k=2, which="BE", tol=1e-5, seed=2)
    window = hesd.eigenvalues(op, k=2, which="BE", tol=1e-5, seed=2, reorth="window")
    assert window.converged, name
    scale = float(full.eigenvalues.abs().max())
    assert torch.allclose(window.eigenvalues.double(), full.eigenvalues.double(), rtol=0, atol=1e-4 * scale), name


def test_should_stop_may_take_the_residual_norm():
    """A three-argument ``should_stop`` gets β_j, which becomes the next off-diagonal when the recurrence goes on."""
    A, _ = _indefinite()
    seen: list[float] = []
    lz.lanczos(A, torch.ones(300, dtype=torch.float64), 12, should_stop=lambda a, b, beta: seen.append(beta) or False)
    r = lz.lanczos(A, torch.ones(300, dtype=torch.float64), 12)
    assert seen == pytest.approx(r.beta.tolist(), rel=0, abs=0)  # steps 0..10 (the last step is not asked)
    two: list[int] = []
    lz.lanczos(A, torch.ones(300, dtype=torch.float64), 5, should_stop=lambda a, b: two.append(len(b)) or False)
    assert two == [0, 1, 2, 3]


@pytest.mark.parametrize("kwargs", [{"k": 2}, {"k": 3, "which": "BE"}, {"k": 1, "return_eigenvectors": True},
                                    {"k": 1, "max_basis": 10}])  # fmt: skip
def test_the_window_refuses_what_it_cannot_find(kwargs):
    A, _ = _indefinite()
    with pytest.raises(hesd.HesdValueError, match=r"reorth='window' finds the extreme eigenvalue at each end"):
        hesd.eigenvalues(A, reorth="window", **kwargs)
    with pytest.raises(hesd.HesdValueError, match=r"reorth must be 'full' or 'window', got 'none'"):
        hesd.eigenvalues(A, reorth="none")


def test_the_window_warns_when_not_converged():
    A, _ = _indefinite()
    with pytest.warns(RuntimeWarning, match=r"eigenvalues: not converged after 4 products .*; raise max_matvecs, or"):
        r = hesd.eigenvalues(A, k=1, tol=1e-12, max_matvecs=4, reorth="window")
    assert not r.converged and r.num_matvecs == 4
