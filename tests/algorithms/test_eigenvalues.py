"""Lanczos eigenvalues and power iteration against dense eigensolvers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

import hesd
from helpers import make_case, random_symmetric
from hesd.algorithms import lanczos

CE = torch.nn.functional.cross_entropy


def _indefinite(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    eigs = torch.cat([torch.linspace(-3, 10, n - 3, dtype=torch.float64), torch.tensor([-7.0, 25.0, 40.0])])
    eigs = eigs[torch.randperm(n, generator=g)]
    return random_symmetric(n, eigs, seed), torch.sort(eigs).values


@pytest.mark.parametrize("which", ["LA", "SA", "BE", "LM"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_eigenvalues_match_eigvalsh(which, k):
    A, eigs = _indefinite(seed=k)
    res = hesd.eigenvalues(A, k=k, which=which, tol=1e-10, seed=3, return_eigenvectors=True)
    assert res.converged
    if which == "LA":
        ref = eigs.flip(0)[:k]
    elif which == "SA":
        ref = eigs[:k]
    elif which == "BE":
        ref = torch.cat([eigs[: k // 2], eigs[len(eigs) - (k - k // 2) :]])
    else:
        ref = eigs[torch.argsort(eigs.abs(), descending=True)][:k]
    assert torch.allclose(res.eigenvalues, ref, atol=1e-8), (res.eigenvalues, ref)
    V = res.eigenvectors
    assert torch.allclose(A @ V, V * res.eigenvalues, atol=1e-6)
    assert (res.residuals <= 1e-10 * 40 + 1e-12).all()


def test_eigenvalues_with_restarts_small_basis():
    A, eigs = _indefinite(n=300, seed=4)
    res = hesd.eigenvalues(A, k=4, which="LA", tol=1e-9, max_basis=12, max_matvecs=5000)
    assert res.converged and res.info["restarts"] > 0
    assert torch.allclose(res.eigenvalues, eigs.flip(0)[:4], atol=1e-7)


def test_thick_restart_rotates_the_basis_in_place_in_column_blocks(monkeypatch):
    """A restart rotates the basis a block of columns at a time (no second basis in memory): blocks that
    do not divide the dimension give the same Ritz values and vectors as one block."""
    import hesd.algorithms.eigen as eigen

    A, eigs = _indefinite(n=300, seed=4)
    one = hesd.eigenvalues(A, k=4, which="LA", tol=1e-9, max_basis=12, max_matvecs=5000, return_eigenvectors=True)
    monkeypatch.setattr(eigen, "_RESTART_COLUMNS", 7)
    blocks = hesd.eigenvalues(A, k=4, which="LA", tol=1e-9, max_basis=12, max_matvecs=5000, return_eigenvectors=True)
    assert blocks.info["restarts"] == one.info["restarts"] > 2
    assert torch.allclose(blocks.eigenvalues, eigs.flip(0)[:4], atol=1e-7)
    assert torch.allclose(blocks.eigenvalues, one.eigenvalues, rtol=0, atol=1e-12)
    overlap = (blocks.eigenvectors * one.eigenvectors).sum(0).abs()  # the same vectors, up to sign
    assert torch.allclose(overlap, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-10)


def test_an_operator_that_returns_its_input_is_not_updated_in_place():
    """The recurrences update a product's output in place; an operator may hand back the very tensor it was
    given (here the identity), which must then be copied first, or the basis would be overwritten."""
    from hesd.operators import LinearOperator

    class ReturnsItsInput(LinearOperator):
        def __init__(self, A: torch.Tensor) -> None:
            self.A, self.shape, self.dtype, self.device = A, tuple(A.shape), A.dtype, A.device

        def _matmat(self, V: torch.Tensor) -> torch.Tensor:
            return V if bool((self.A == torch.eye(len(self.A), dtype=self.A.dtype)).all()) else self.A @ V

    eye = ReturnsItsInput(torch.eye(30, dtype=torch.float64))
    v0 = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = lanczos(eye, v0.clone(), 5)
    assert r.alpha[0] == pytest.approx(1.0, abs=1e-14) and r.broke_down and len(r.alpha) == 1
    res = hesd.eigenvalues(eye, k=2, which="BE", tol=1e-10)
    assert res.eigenvalues.tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    spec = hesd.slq(eye, 5, 2, seed=0)
    assert all(np.allclose(v, 1.0, atol=1e-12) for v in spec.values)


def test_eigenvalues_repeated():
    eigs = torch.tensor([5.0, 5.0, 5.0, 2.0, 1.0, 1.0, -3.0, -3.0] + [0.5] * 40, dtype=torch.float64)
    A = random_symmetric(len(eigs), eigs, seed=5)
    res = hesd.eigenvalues(A, k=3, which="LA", tol=1e-10)
    # A single Krylov space sees each distinct eigenvalue once; restarts with fresh vectors find copies.
    assert torch.allclose(res.eigenvalues[0], torch.tensor(5.0, dtype=torch.float64), atol=1e-9)
    assert res.converged
    lo = hesd.eigenvalues(A, k=1, which="SA", tol=1e-10)
    assert abs(float(lo.eigenvalues[0]) + 3.0) < 1e-9


def test_eigenvalues_full_dimension_and_k_equals_n():
    A, eigs = _indefinite(n=10, seed=6)
    res = hesd.eigenvalues(A, k=10, which="SA", tol=1e-12)
    assert torch.allclose(res.eigenvalues, eigs, atol=1e-10)


def test_eigenvalues_accepts_scipy_and_numpy_and_hessian_operator():
    A, eigs = _indefinite(n=60, seed=7)
    for obj in (A.numpy(), spla.aslinearoperator(A.numpy())):
        r = hesd.eigenvalues(obj, k=2, which="BE", tol=1e-10)
        assert np.allclose(r.eigenvalues.numpy(), [eigs[0], eigs[-1]], atol=1e-8)
    model, batches, _ = make_case("attention", seed=1)
    H = hesd.exact_hessian(model, CE, batches)
    ev = torch.linalg.eigvalsh(H)
    op = hesd.HessianOperator(model, CE, batches)
    r = hesd.eigenvalues(op, k=2, which="BE", tol=1e-10)
    assert torch.allclose(r.eigenvalues, torch.stack([ev[0], ev[-1]]), atol=1e-9)


class _Hinted(hesd.operators.MatrixOperator):
    def __init__(self, matrix, direction):
        super().__init__(matrix)
        self.direction = direction
        self.asked = 0

    def start_direction(self):
        self.asked += 1
        return self.direction


def test_start_hint_mixes_the_operators_direction_into_the_start():
    """A start direction close to the top eigenvectors saves products; the answer is unchanged."""
    n = 300
    evals = torch.cat([torch.linspace(0.0, 1.0, n - 3, dtype=torch.float64), torch.tensor([1.2, 1.3, 1.5]).double()])
    Qm, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    A = Qm @ torch.diag(evals) @ Qm.T
    top = Qm[:, -3:] @ torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)  # in the top-3 span, like a gradient
    plain = hesd.eigenvalues(A, k=3, tol=1e-8, seed=5)
    op = _Hinted(A, top)
    hinted = hesd.eigenvalues(op, k=3, tol=1e-8, seed=5)
    assert op.asked == 1
    assert torch.allclose(hinted.eigenvalues, torch.tensor([1.5, 1.3, 1.2], dtype=torch.float64), atol=1e-10)
    assert torch.allclose(plain.eigenvalues, hinted.eigenvalues, atol=1e-10)
    assert hinted.num_matvecs < plain.num_matvecs
    off = hesd.eigenvalues(_Hinted(A, top), k=3, tol=1e-8, seed=5, start_hint=False)
    assert off.num_matvecs == plain.num_matvecs and torch.equal(off.eigenvalues, plain.eigenvalues)
    sa = _Hinted(A, top)
    hesd.eigenvalues(sa, k=2, which="SA", tol=1e-6, seed=5)
    assert sa.asked == 0  # the gradient says nothing about the smallest eigenvalues
    given = _Hinted(A, top)
    hesd.eigenvalues(given, k=1, tol=1e-6, v0=torch.ones(n, dtype=torch.float64))
    assert given.asked == 0  # an explicit start vector wins


def test_hessian_start_direction_is_the_gradient_or_none_at_a_stationary_point():
    model, batches, _ = make_case("mlp", seed=12)
    op = hesd.HessianOperator(model, CE, batches)
    assert torch.equal(op.start_direction(), op.gradient())
    # Least squares solved exactly: zero gradient, so no hint, and a random start as before.
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1).double()
    X = torch.randn(20, 3, dtype=torch.float64)
    with torch.no_grad():
        y = lin(X)
    mse = torch.nn.functional.mse_loss
    zero = hesd.HessianOperator(lin, mse, (X, y))
    assert zero.start_direction() is None
    H = hesd.exact_hessian(lin, mse, (X, y))
    r = hesd.eigenvalues(zero, k=1, tol=1e-10)
    assert torch.allclose(r.eigenvalues, torch.linalg.eigvalsh(H)[-1:], atol=1e-10)


def test_eigenvalues_seed_reproducible():
    A, _ = _indefinite(n=200, seed=8)
    r1 = hesd.eigenvalues(A, k=3, tol=1e-3, seed=11)
    r2 = hesd.eigenvalues(A, k=3, tol=1e-3, seed=11)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues) and r1.num_matvecs == r2.num_matvecs


def test_eigenvalues_not_converged_warns():
    A, _ = _indefinite(n=400, seed=9)
    with pytest.warns(RuntimeWarning, match="not converged"):
        r = hesd.eigenvalues(A, k=3, tol=1e-14, max_matvecs=5)
    assert not r.converged and r.num_matvecs == 5


def test_eigenvalues_errors():
    A = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="eigenvalues: k=5 is larger than the operator's dimension 4"):
        hesd.eigenvalues(A, k=5)
    with pytest.raises(ValueError, match="which must be one of"):
        hesd.eigenvalues(A, which="XX")
    with pytest.raises(ValueError, match="k must be an integer"):
        hesd.eigenvalues(A, k=0)
    with pytest.raises(TypeError, match="eigenvalues: expected"):
        hesd.eigenvalues("matrix")
    with pytest.raises(ValueError, match="square"):
        hesd.eigenvalues(torch.ones(3, 4))


def test_power_iteration_matches_largest_magnitude():
    eigs = torch.cat([torch.linspace(-1, 1, 50, dtype=torch.float64), torch.tensor([-9.0, 6.0, 4.0])])
    A = random_symmetric(len(eigs), eigs, seed=10)
    r = hesd.power_iteration(A, k=3, tol=1e-10, max_iter=5000)
    assert r.converged
    assert torch.allclose(r.eigenvalues, torch.tensor([-9.0, 6.0, 4.0], dtype=torch.float64), atol=1e-8)


def test_power_iteration_warns_when_magnitudes_tie():
    A = torch.diag(torch.tensor([5.0, -5.0] + [0.1] * 10, dtype=torch.float64))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = hesd.power_iteration(A, k=1, tol=1e-8, max_iter=50)
    assert not r.converged and any("not all" in str(x.message) for x in w)


def test_lanczos_breakdown_on_invariant_subspace():
    eigs = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    A = torch.diag(eigs)
    v0 = torch.tensor([1.0, 1.0, 1.0, 0, 0, 0], dtype=torch.float64)
    res = lanczos(A, v0, 6)
    assert res.broke_down and len(res.alpha) == 3
    theta = torch.linalg.eigvalsh(torch.diag(res.alpha) + torch.diag(res.beta, 1) + torch.diag(res.beta, -1))
    assert torch.allclose(theta, eigs[:3], atol=1e-12)


def test_lanczos_errors():
    A = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="non-zero"):
        lanczos(A, torch.zeros(3, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="reorth"):
        lanczos(A, torch.ones(3, dtype=torch.float64), 2, reorth="some")
    with pytest.raises(ValueError, match="window"):
        lanczos(A, torch.ones(3, dtype=torch.float64), 2, reorth="window")


@pytest.mark.parametrize("n", [0, 5, 16, 47, 96, 97, 100, 111, 128])
def test_gaussian_draws_in_chunks_the_values_of_one_draw(monkeypatch, n):
    """Chunks of 32 (a last chunk of 1 to 15 entries joins the one before): one float32 randn's values, any dtype."""
    from hesd.algorithms import probes

    whole = torch.randn(n, generator=torch.Generator().manual_seed(11), dtype=torch.float32)
    monkeypatch.setattr(probes, "GAUSSIAN_CHUNK", 32)
    assert torch.equal(probes.gaussian(n, 11, torch.float64, torch.device("cpu")), whole.double())
    out = torch.full((n,), float("nan"))
    assert probes.gaussian(n, 11, torch.float32, torch.device("cpu"), out=out) is out
    assert torch.equal(out, whole)


def test_the_start_vector_is_built_in_place_as_the_normalised_mix(monkeypatch):
    """With the hint, the start is (z/‖z‖ + d/‖d‖) normalised, z one seeded float32 draw: built in blocks of
    the basis, it gives the same run as passing that vector as v0."""
    import importlib

    from hesd.algorithms.lanczos import row_norms
    from hesd.operators.linear import as_operator

    eigen = importlib.import_module("hesd.algorithms.eigen")
    n = 300
    evals = torch.cat([torch.linspace(0.0, 1.0, n - 3), torch.tensor([1.2, 1.3, 1.5])])
    Qm, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(3)))
    A = (Qm * evals) @ Qm.T
    d = Qm[:, -3:].sum(1) + 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(4))
    z = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    # the norms as hesd takes them (float32 products summed in float64): d.double().norm() rounds to a float32
    # one ulp away on some CPUs (AVX-512), and the runs then differ in the last bits
    znorm, dnorm = row_norms(torch.stack([z, d]), as_operator(A, "test"))
    v0 = z / znorm + d / dnorm
    monkeypatch.setattr(eigen, "_RESTART_COLUMNS", 7)  # blocks that do not divide n
    hinted = hesd.eigenvalues(_Hinted(A, d), k=2, tol=1e-5, seed=5, return_eigenvectors=True)
    given = hesd.eigenvalues(A, k=2, tol=1e-5, v0=v0, return_eigenvectors=True)
    assert hinted.num_matvecs == given.num_matvecs
    assert torch.equal(hinted.eigenvalues, given.eigenvalues) and torch.equal(hinted.eigenvectors, given.eigenvectors)
    assert torch.allclose(hinted.eigenvalues, torch.tensor([1.5, 1.3]), atol=1e-4)


@pytest.mark.parametrize("compiled", [False, True], ids=["pytorch", "compiled"])
def test_the_first_pass_is_local_except_after_a_restart(monkeypatch, compiled):
    """Each expansion's first Gram-Schmidt pass reads q_{j-1} and q_j only, except the column after a thick
    restart (it couples to every kept Ritz vector); the second pass reads the whole basis. On a float32
    operator with many restarts the eigenpairs still match float64 ``eigvalsh`` and stay orthonormal. The same
    with the compiled step (hesd.algorithms.fused), where the passes are its first two sweeps."""
    import hesd.algorithms.eigen as eigen
    from hesd.algorithms import fused

    if compiled and not fused.AVAILABLE:
        pytest.skip("Numba is not installed (the fast extra)")
    monkeypatch.setattr(fused, "ENABLED", compiled)
    widths: list[int] = []
    if compiled:
        products, then = fused.products, fused.subtract_then_products
        monkeypatch.setattr(fused, "products", lambda S, rows, w: widths.append(len(rows)) or products(S, rows, w))
        monkeypatch.setattr(
            fused, "subtract_then_products", lambda S, r, h, o, w: widths.append(len(o)) or then(S, r, h, o, w)
        )
    else:
        real = eigen.inner
        monkeypatch.setattr(eigen, "inner", lambda Q, w: widths.append(Q.shape[1]) or real(Q, w))
    A, eigs = _indefinite(n=400, seed=6)
    res = hesd.eigenvalues(A.float(), k=3, tol=1e-5, max_basis=8, max_matvecs=3000, return_eigenvectors=True)
    assert res.converged and res.info["restarts"] >= 3
    first, second = widths[0::2], widths[1::2]  # no breakdown here: two passes per product
    assert len(first) == len(second) == res.num_matvecs
    full = [f for f, s in zip(first, second, strict=True) if f == s and f > 2]
    assert first[0] == 1 and len(full) == res.info["restarts"]  # the start, then one per restart
    assert all(f == 2 for f, s in zip(first[1:], second[1:], strict=True) if not (f == s and f > 2))
    top = eigs.flip(0)[:3]
    assert torch.allclose(res.eigenvalues.double(), top, rtol=1e-5, atol=0), (res.eigenvalues, top)
    V = res.eigenvectors.double()
    assert torch.allclose(V.T @ V, torch.eye(3, dtype=torch.float64), atol=1e-5)
    assert ((A @ V - V * top).norm(dim=0) <= 1e-4 * top.abs().max()).all()
