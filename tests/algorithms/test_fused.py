"""The compiled Lanczos step (hesd.algorithms.fused): kernels against float64, and Lanczos against the PyTorch path."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import hesd
from hesd.algorithms import fused
from hesd.algorithms.inner import CHUNK

pytest.importorskip("numba")
inner_module = importlib.import_module("hesd.algorithms.inner")
basis_module = importlib.import_module("hesd.algorithms.basis")

N = 3 * inner_module.MIN_CHUNKS_PER_THREAD * CHUNK + 77  # up to three threads, a short last chunk


def _data(seed: int, rows: int = 4, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=g), torch.randn(n, generator=g)


def test_products_against_float64():
    S, w = _data(0)
    got = fused.products(S, [2, 0], w)
    want = S[[2, 0]].double() @ w.double()
    assert got.dtype == torch.float64
    # blocks of 256 in float32, then float64: 1e-9 of the norms' product (a float32 sum over each chunk: 1e-8)
    assert torch.allclose(got, want, rtol=0, atol=1e-9 * float(S.double().norm(dim=1).max() * w.double().norm()))


def test_subtract_then_products_against_float64():
    S, w = _data(1)
    h = torch.tensor([0.3, -1.7], dtype=torch.float64)
    w64 = w.double() - S[[1, 3]].double().T @ h
    got = fused.subtract_then_products(S, [1, 3], h, range(4), w)
    assert torch.allclose(w.double(), w64, rtol=0, atol=1e-5)  # w updated in place
    x = w.double()  # the products are those of the updated float32 vector, accumulated as in float64
    scale = float(S.double().norm(dim=1).max() * x.norm())
    assert torch.allclose(got[:4], S.double() @ x, rtol=0, atol=1e-9 * scale)
    assert abs(float(got[4]) - float(x @ x)) < 1e-9 * float(x @ x)


@pytest.mark.parametrize("target", [0, 3])  # among the rows subtracted (a full window's oldest), or a fresh slot
def test_subtract_into_writes_the_target_after_reading_it(target):
    S, w = _data(2)
    rows = [0, 1, 2]
    h = torch.tensor([0.25, -0.5, 2.0], dtype=torch.float64)
    want = (w.double() - S[rows].double().T @ h) / 3.0
    fused.subtract_into(S, rows, h, w, target, 3.0)
    assert torch.allclose(S[target].double(), want, rtol=0, atol=1e-5)


def test_the_bits_do_not_depend_on_the_number_of_threads(monkeypatch):
    S, w = _data(3)
    h = torch.tensor([0.1, 0.2], dtype=torch.float64)
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(inner_module, "_threads", lambda chunks, t=threads: t)
        x, T = w.clone(), S.clone()
        a = fused.products(T, [0, 1], x)
        b = fused.subtract_then_products(T, [0, 1], h, range(4), x)
        fused.subtract_into(T, range(4), b[:4], x, 1, 2.0)
        results.append((a, b, T))
    for a, b, T in results[1:]:
        assert torch.equal(a, results[0][0]) and torch.equal(b, results[0][1]) and torch.equal(T, results[0][2])


class _Diag(hesd.operators.LinearOperator):
    def __init__(self, d: torch.Tensor) -> None:
        self.d = d
        self.shape, self.dtype, self.device = (d.shape[0], d.shape[0]), d.dtype, d.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.d[:, None] * V


def _spectrum(n: int = 20_000) -> torch.Tensor:
    d = torch.randn(n, generator=torch.Generator().manual_seed(5)) * 0.5
    d[:6] = torch.tensor([50.0, 49.9, 49.8, 30.0, -5.0, -4.0])
    return d


def _run(monkeypatch, enabled: bool, dtype: torch.dtype = torch.float32, **kw) -> list[hesd.algorithms.LanczosResult]:
    monkeypatch.setattr(fused, "ENABLED", enabled)
    V0 = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(6)).to(dtype)
    return hesd.algorithms.lanczos_lockstep(_Diag(_spectrum().to(dtype)), V0, 40, **kw)


@pytest.mark.parametrize(("reorth", "window", "steps"), [("full", None, 40), ("window", 3, 10), ("window", 5, 10)])
def test_lanczos_with_the_compiled_step_agrees_with_the_pytorch_path(monkeypatch, reorth, window, steps):
    """float32, two recurrences in lockstep, both paths against float64: each was measured within 4.7e-4 of it
    (λmax = 50, with 49.9 and 49.8 beside it). A window loses orthogonality once λmax converges and rounding
    differences then grow (as from any perturbation of the start), so it is compared before that."""
    calls: list[int] = []
    real = fused.subtract_into
    monkeypatch.setattr(fused, "subtract_into", lambda *a: calls.append(1) or real(*a))
    on = _run(monkeypatch, True, reorth=reorth, window=window)
    assert len(calls) == 2 * 39  # the compiled step ran (each recurrence, each step but the last)
    off = _run(monkeypatch, False, reorth=reorth, window=window)
    exact = _run(monkeypatch, True, torch.float64, reorth=reorth, window=window)  # (float64: the PyTorch path)
    for a, b, x in zip(on, off, exact, strict=True):
        for r in (a, b):
            assert torch.allclose(r.alpha[:steps], x.alpha[:steps], rtol=0, atol=1e-3)
            assert torch.allclose(r.beta[:steps], x.beta[:steps], rtol=0, atol=1e-3)
        T = np.diag(a.alpha) + np.diag(a.beta, 1) + np.diag(a.beta, -1)
        theta = np.linalg.eigvalsh(T)
        assert abs(theta[-1] - 50.0) < 1e-4 and abs(theta[0] + 5.0) < 1e-4


def test_the_compiled_step_keeps_the_window_orthonormal(monkeypatch):
    """The stored vectors after each step: orthonormal to float32 rounding, as with the PyTorch path."""
    seen: list[float] = []
    real = basis_module.Basis.add

    def add(self, Q, scale=None):
        out = real(self, Q, scale)
        V = self.store[0, : min(self.count, self.size)].double()
        seen.append(float((V @ V.T - torch.eye(V.shape[0], dtype=torch.float64)).abs().max()))
        return out

    monkeypatch.setattr(basis_module.Basis, "add", add)
    _run(monkeypatch, True, reorth="window", window=3)
    assert len(seen) == 40 and max(seen) < 1e-5


def test_the_explicit_norm_where_pythagoras_would_not_hold(monkeypatch):
    """With the limit below zero every step subtracts the second pass and takes the norm explicitly. Both ways are
    within float32 rounding of float64 (measured: 9.0e-4 and 2.5e-4 at most, λmax = 50 beside 49.9 and 49.8)."""
    exact = _run(monkeypatch, True, torch.float64, reorth="full")
    on = _run(monkeypatch, True, reorth="full")
    monkeypatch.setattr(basis_module, "PYTHAGORAS_LIMIT", -1.0)
    calls: list[int] = []
    real = fused.subtract_into
    monkeypatch.setattr(fused, "subtract_into", lambda *a: calls.append(1) or real(*a))
    explicit = _run(monkeypatch, True, reorth="full")
    assert calls == []
    for a, b, x in zip(on, explicit, exact, strict=True):
        assert not torch.equal(a.alpha, b.alpha)  # the two ways did run
        for r in (a, b):
            assert torch.allclose(r.alpha, x.alpha, rtol=0, atol=1e-3)
            assert torch.allclose(r.beta, x.beta, rtol=0, atol=1e-3)


def test_a_recurrence_that_stops_leaves_the_others_as_they_would_run_alone(monkeypatch):
    monkeypatch.setattr(fused, "ENABLED", True)
    op = _Diag(_spectrum())
    V0 = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(7))
    stop_early = [lambda a, b: len(a) == 5, None]
    both = hesd.algorithms.lanczos_lockstep(op, V0, 12, reorth="window", window=3, should_stop=stop_early)
    alone = hesd.algorithms.lanczos(op, V0[:, 1], 12, reorth="window", window=3)
    assert both[0].num_matvecs == 5 and both[1].num_matvecs == 12
    assert torch.allclose(both[1].alpha, alone.alpha, rtol=0, atol=1e-5)
    assert torch.allclose(both[1].beta, alone.beta, rtol=0, atol=1e-5)


def test_a_non_finite_product_is_still_refused(monkeypatch):
    monkeypatch.setattr(fused, "ENABLED", True)
    d = _spectrum()
    d[100] = float("nan")
    with pytest.raises(hesd.NonFiniteError, match="NaN/inf"):
        hesd.algorithms.lanczos(_Diag(d), torch.ones(d.shape[0]), 5, reorth="window", window=3)


def test_the_pytorch_path_without_numba_or_when_turned_off(monkeypatch):
    S, w = _data(8, n=100)
    assert fused.usable(S, w)
    assert not fused.usable(S.double(), w.double()) and not fused.usable(S[:, ::2], w[::2])
    monkeypatch.setattr(fused, "ENABLED", False)
    assert not fused.usable(S, w)
    monkeypatch.setattr(fused, "ENABLED", True)
    monkeypatch.setattr(fused, "AVAILABLE", False)
    assert not fused.usable(S, w)


def test_summing_by_blocks_keeps_windowed_lanczos_at_its_float32_accuracy(monkeypatch):
    """The largest Ritz value of 30 windowed steps on a float32 diagonal operator with λmax = 30, 2 M entries, over
    six starts. Measured (16 starts): rms error 9.0e-7 by blocks of 256, 1.6e-6 on the PyTorch path, 6.9e-6 with each
    chunk summed whole in float32 by the same vectorised loop (a bound of 3e-6 fails that)."""
    monkeypatch.setattr(fused, "ENABLED", True)
    n = 2_000_000
    d = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 2 - 0.5
    d[:5] = torch.tensor([30.0, 20.0, 15.0, 12.0, 11.0])
    errors = []
    for seed in range(6):
        v0 = torch.randn(n, generator=torch.Generator().manual_seed(100 + seed))
        r = hesd.algorithms.lanczos(_Diag(d), v0, 30, reorth="window", window=3)
        T = np.diag(r.alpha) + np.diag(r.beta, 1) + np.diag(r.beta, -1)
        errors.append(np.linalg.eigvalsh(T)[-1] - 30.0)
    assert float(np.sqrt(np.mean(np.square(errors)))) < 3e-6


def _count_compiled_steps(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = fused.subtract_into
    monkeypatch.setattr(fused, "subtract_into", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize(("k", "which"), [(3, "LA"), (2, "BE"), (2, "SA")])
def test_restarted_eigenvalues_with_the_compiled_step_agree_with_float64(monkeypatch, k, which):
    """Restarted Lanczos (a basis of 8: several thick restarts) on the float32 diagonal operator: eigenvalues within
    float32 rounding of the exact ones with the compiled step and without it, and eigenvectors with small residuals."""
    d = _spectrum()
    exact = {"LA": [50.0, 49.9, 49.8], "BE": [-5.0, 50.0], "SA": [float(d.min()), float(d.kthvalue(2).values)]}
    for enabled in (True, False):
        monkeypatch.setattr(fused, "ENABLED", enabled)
        calls = _count_compiled_steps(monkeypatch)
        r = hesd.eigenvalues(_Diag(d), k=k, which=which, tol=1e-5, max_basis=8, return_eigenvectors=True, seed=3)
        assert r.converged and r.info["restarts"] >= 2
        assert (len(calls) > 0) == enabled  # the compiled step ran, or not at all
        assert torch.allclose(r.eigenvalues.double(), torch.tensor(exact[which], dtype=torch.float64), atol=2e-4)
        X = r.eigenvectors.double()
        residual = (d.double()[:, None] * X - X * r.eigenvalues.double()).norm(dim=0)
        assert float(residual.max()) < 1e-5 * 50 * 2  # the bound it stopped on, with float32's slack
        assert float((X.T @ X - torch.eye(k, dtype=torch.float64)).abs().max()) < 1e-4


def test_restarted_eigenvalues_fall_back_to_the_explicit_norm(monkeypatch):
    """With the Pythagoras limit below zero every expansion subtracts the second pass before the norm."""
    monkeypatch.setattr(fused, "ENABLED", True)
    monkeypatch.setattr(basis_module, "PYTHAGORAS_LIMIT", -1.0)
    calls = _count_compiled_steps(monkeypatch)
    products: list[int] = []
    real_products = fused.products
    monkeypatch.setattr(fused, "products", lambda *a: products.append(1) or real_products(*a))
    r = hesd.eigenvalues(_Diag(_spectrum()), k=1, tol=1e-5, max_basis=8)
    assert r.converged and calls == [] and len(products) == r.num_matvecs
    assert abs(float(r.eigenvalues[0]) - 50.0) < 2e-4


def test_restarted_eigenvalues_through_an_invariant_subspace_with_the_compiled_step(monkeypatch):
    """Three distinct eigenvalues: the Krylov space is invariant after three products (β ≈ 0, where Pythagoras would
    lose every digit); the loop restarts from a fresh vector and still finds both ends."""
    monkeypatch.setattr(fused, "ENABLED", True)
    d = torch.tensor([1.0, 2.0, 3.0]).repeat(7_000)[torch.randperm(21_000, generator=torch.Generator().manual_seed(9))]
    r = hesd.eigenvalues(_Diag(d), k=2, which="BE", tol=1e-6, max_basis=10)
    assert r.converged
    assert torch.allclose(r.eigenvalues, torch.tensor([1.0, 3.0]), atol=1e-5)
