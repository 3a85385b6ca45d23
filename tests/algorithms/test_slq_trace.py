"""SLQ, Spectrum and trace estimators against exact spectra and traces."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import hesd
from helpers import make_case, random_symmetric

CE = torch.nn.functional.cross_entropy


def test_slq_with_full_steps_reproduces_exact_spectrum(case):
    name, model, batches, _ = case
    H = hesd.exact_hessian(model, CE, batches)
    ev = torch.linalg.eigvalsh(H).numpy()
    P = H.shape[0]
    op = hesd.HessianOperator(model, CE, batches)
    spec = hesd.slq(op, num_steps=P, num_probes=2, seed=0)
    for v, w in zip(spec.values, spec.weights, strict=True):
        assert abs(w.sum() - 1) < 1e-12
        # Every Ritz value is an eigenvalue, and the extremes are found.
        assert np.abs(v[:, None] - ev[None, :]).min(axis=1).max() < 1e-8 * max(1, np.abs(ev).max()), name
        assert abs(v[0] - ev[0]) < 1e-8 and abs(v[-1] - ev[-1]) < 1e-8
    assert spec.dim == P and abs(spec.trace - float(torch.trace(H))) < 5 * abs(ev).sum() / np.sqrt(2)


def test_slq_exact_on_distinct_spectrum():
    eigs = torch.linspace(-2, 5, 40, dtype=torch.float64)
    A = random_symmetric(40, eigs, seed=1)
    spec = hesd.slq(A, num_steps=40, num_probes=3, seed=2)
    for v, w in zip(spec.values, spec.weights, strict=True):
        assert np.allclose(v, eigs.numpy(), atol=1e-9)
        assert abs(w.sum() - 1) < 1e-12
    # Quadrature is exact for polynomials: moments equal tr(A^k)/n averaged over probes' v^T A^k v.
    assert abs(spec.moment(0) - 1) < 1e-12


def test_slq_extremes_converge_from_inside():
    eigs = torch.cat([torch.linspace(-1, 3, 497, dtype=torch.float64), torch.tensor([-4.0, 8.0, 12.0])])
    A = random_symmetric(500, eigs, seed=3)
    prev_lo, prev_hi = np.inf, -np.inf
    for steps in (5, 10, 20, 40, 80):
        s = hesd.slq(A, num_steps=steps, num_probes=1, seed=4)
        assert s.lambda_max <= 12 + 1e-9 and s.lambda_min >= -4 - 1e-9  # interlacing: from inside
        assert s.lambda_max >= prev_hi - 1e-9 and s.lambda_min <= prev_lo + 1e-9  # monotone
        prev_lo, prev_hi = s.lambda_min, s.lambda_max
    assert abs(prev_hi - 12) < 1e-6 and abs(prev_lo + 4) < 1e-6


def test_slq_breakdown_handled():
    A = torch.diag(torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 3.0], dtype=torch.float64))
    spec = hesd.slq(A, num_steps=6, num_probes=2)
    assert all(spec.broke_down)
    for v, w in zip(spec.values, spec.weights, strict=True):
        assert np.allclose(v, [1, 2, 3], atol=1e-12)
        assert np.allclose(w, [0.5, 1 / 3, 1 / 6], atol=1e-12)  # Rademacher: weight = multiplicity / n


def test_slq_seed_reproducible_and_probes_differ():
    A = random_symmetric(60, torch.linspace(-1, 1, 60), seed=5)
    s1, s2 = hesd.slq(A, 10, 2, seed=7), hesd.slq(A, 10, 2, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(s1.values, s2.values, strict=True))
    assert not np.array_equal(s1.values[0], s1.values[1])
    assert not np.array_equal(s1.values[0], hesd.slq(A, 10, 1, seed=8).values[0])


@pytest.mark.parametrize(
    ("reorth", "kw"), [("full", {}), ("full", {"basis_dtype": torch.float32}), ("window", {"window": 5}), ("none", {})]
)
def test_slq_memory_modes(reorth, kw):
    eigs = torch.cat([torch.linspace(0, 1, 396, dtype=torch.float64), torch.tensor([-2.0, 5.0, 6.0, 7.0])])
    A = random_symmetric(400, eigs, seed=6)
    s = hesd.slq(A, num_steps=60, num_probes=1, seed=1, reorth=reorth, **kw)
    assert abs(s.lambda_max - 7) < 1e-4 and abs(s.lambda_min + 2) < 1e-3
    assert abs(s.weights[0].sum() - 1) < 1e-9


def test_spectrum_density_integrates_to_one_and_from_ritz():
    s = hesd.Spectrum.from_ritz([[-1.0, 0.0, 3.0], [2.0, 4.0]], [[0.2, 0.5, 0.3], [0.6, 0.4]], dim=5)
    t, d = s.density(np.linspace(-10, 15, 20001), sigma=0.3)
    assert abs(np.trapezoid(d, t) - 1) < 1e-6
    assert s.lambda_min == -1 and s.lambda_max == 4
    assert abs(s.moment(1) - (0.5 * (-0.2 + 0.9) + 0.5 * (1.2 + 1.6))) < 1e-12
    assert hesd.Spectrum.from_dict(s.to_dict()).to_dict() == s.to_dict()
    single = hesd.Spectrum.from_ritz([1.0, 2.0], [0.5, 0.5])
    assert single.num_probes == 1
    with pytest.raises(ValueError, match="probe 0 has 2 values and 1 weights"):
        hesd.Spectrum.from_ritz([[1.0, 2.0]], [[1.0]])
    with pytest.raises(ValueError, match="dimension is unknown"):
        _ = single.trace


def test_trace_estimators_converge_within_standard_error():
    eigs = torch.cat([torch.logspace(-3, 0, 290, dtype=torch.float64), torch.linspace(5, 50, 10, dtype=torch.float64)])
    A = random_symmetric(300, eigs, seed=8)
    true = float(eigs.sum())
    for method in ("hutchinson", "hutchpp", "auto"):
        errs, ses = [], []
        for seed in range(8):
            r = hesd.trace(A, method=method, num_matvecs=60, seed=seed)
            errs.append(r.estimate - true)
            ses.append(r.stderr)
        z = np.abs(errs) / np.array(ses)
        assert np.mean(z <= 3) >= 0.85, (method, z)
    # Hutch++ uses its products better on a decaying spectrum.
    e_h = np.mean([abs(hesd.trace(A, "hutchinson", 90, seed=s).estimate - true) for s in range(8)])
    e_pp = np.mean([abs(hesd.trace(A, "hutchpp", 90, seed=s).estimate - true) for s in range(8)])
    assert e_pp < e_h / 3
    # ... and "auto" sees it: it keeps Hutch++, with the same probes and so the same result.
    for seed in range(4):
        auto, pp = hesd.trace(A, "auto", 90, seed=seed), hesd.trace(A, "hutchpp", 90, seed=seed)
        assert auto.method == "hutchpp" and auto.estimate == pp.estimate and auto.info["left"] < 0.2
        assert auto.info["hutchpp_variance"] < auto.info["hutchinson_variance"]
    # More products, smaller error.
    big = hesd.trace(A, "hutchpp", 600, seed=0)
    assert abs(big.estimate - true) < 3 * big.stderr and big.stderr < 0.5 * hesd.trace(A, "hutchpp", 60).stderr


def test_trace_auto_falls_back_to_hutchinson_on_a_flat_spectrum():
    """Eigenvalues spread evenly over [-1, 1] (as at initialisation): deflating 20 directions
    removes little, so "auto" spends its products on fresh Hutchinson probes. It stays unbiased
    and beats Hutch++, which wastes two thirds of its products on the deflation."""
    g = torch.Generator().manual_seed(3)
    eigs = torch.empty(400, dtype=torch.float64).uniform_(-1, 1, generator=g)
    A = random_symmetric(400, eigs, seed=6)
    true = float(eigs.sum())
    runs = {m: [hesd.trace(A, m, 60, seed=s) for s in range(40)] for m in ("auto", "hutchpp", "hutchinson")}
    assert sum(r.method == "hutchinson" for r in runs["auto"]) >= 36
    assert all(r.num_matvecs == 60 and r.info["left"] > 0.6 for r in runs["auto"])
    rms = {m: float(np.sqrt(np.mean([(r.estimate - true) ** 2 for r in rs]))) for m, rs in runs.items()}
    assert rms["auto"] < 0.85 * rms["hutchpp"] and rms["hutchinson"] < rms["auto"]
    err = np.array([r.estimate - true for r in runs["auto"]])
    assert abs(err.mean()) < 3 * err.std(ddof=1) / np.sqrt(len(err))  # unbiased
    fallback = next(r for r in runs["auto"] if r.method == "hutchinson")
    assert len(fallback.samples) == 40  # the 40 products left after the 20-column sketch


def test_trace_on_hessian_operator_and_errors():
    model, batches, _ = make_case("cnn", seed=2)
    H = hesd.exact_hessian(model, CE, batches)
    op = hesd.HessianOperator(model, CE, batches)
    r = hesd.trace(op, "hutchpp", num_matvecs=op.shape[0] * 3)  # sketch spans everything: exact
    assert abs(r.estimate - float(torch.trace(H))) < 1e-8
    r = hesd.trace(op, "auto", num_matvecs=op.shape[0] * 3)  # a spanning sketch: "auto" keeps Hutch++
    assert r.method == "hutchpp" and abs(r.estimate - float(torch.trace(H))) < 1e-8
    with pytest.raises(ValueError, match="method must be"):
        hesd.trace(H, method="xtrace")
    with pytest.raises(ValueError, match="hutchpp needs num_matvecs >= 3"):
        hesd.trace(H, "hutchpp", num_matvecs=2)
    with pytest.raises(ValueError, match="auto needs num_matvecs >= 3"):
        hesd.trace(H, num_matvecs=2)  # "auto", the default


def test_memory_modes_against_full_reorthogonalisation():
    """Where the difference is visible: many steps on a spectrum with well-separated extremes."""
    eigs = torch.cat([torch.linspace(-1, 1, 1996, dtype=torch.float64), torch.tensor([-3.0, 4.0, 6.0, 9.0])])
    A = random_symmetric(2000, eigs, seed=11)
    full = hesd.slq(A, num_steps=150, num_probes=1, seed=3)
    window = hesd.slq(A, num_steps=150, num_probes=1, seed=3, reorth="window", window=4)
    none = hesd.slq(A, num_steps=150, num_probes=1, seed=3, reorth="none")

    def copies(s):
        return int((np.abs(s.values[0] - 9.0) < 1e-6).sum())

    assert copies(full) == 1
    assert copies(window) > 1 and copies(none) > 1  # spurious ("ghost") copies of λmax
    for s in (window, none):  # ... while the extremes themselves stay accurate
        assert abs(s.lambda_max - 9) < 1e-8 and abs(s.lambda_min + 3) < 1e-8
    # The quadrature weight of λmax is split among the copies but its total is kept.
    w_full = full.weights[0][np.abs(full.values[0] - 9) < 1e-6].sum()
    w_win = window.weights[0][np.abs(window.values[0] - 9) < 1e-6].sum()
    assert abs(w_full - w_win) < 1e-3
    # Ct and the type, from the extremes, agree; KH05, a sum over the nodes and weights, moves (plan_basis's docs)
    c_full, c_win = hesd.criteria(full), hesd.criteria(window)
    assert abs(c_full.ct - c_win.ct) < 1e-12 and c_full.hesd_type == c_win.hesd_type
    assert abs(c_full.kh05 - c_win.kh05) > 1e-3 * c_full.kh05
    bf = hesd.slq(A.float(), num_steps=150, num_probes=1, seed=3, basis_dtype=torch.bfloat16)
    assert abs(bf.lambda_max - 9) < 0.05 and abs(bf.lambda_min + 3) < 0.05


@pytest.mark.parametrize("spectrum", ["near-low-rank", "clustered", "outliers"])
def test_full_reorthogonalisation_stays_clean_in_float32(spectrum):
    """200 float32 steps on hard 400-dimensional spectra: the local-then-full Gram-Schmidt of
    ``Basis.project`` keeps one copy of λmax and exact extremes; the plain recurrence does not."""
    g = torch.Generator().manual_seed(1)
    n = 400
    eigs = {
        "near-low-rank": torch.cat([torch.linspace(-20, 100, 30), 1e-4 * torch.rand(n - 30, generator=g)]),
        "clustered": torch.cat([1 + 1e-7 * torch.randn(n // 2, generator=g), torch.linspace(-1, 3, n - n // 2)]),
        "outliers": torch.cat([torch.tensor([1e3, 500, 200, -50.0]), 0.1 * torch.randn(n - 4, generator=g)]),
    }[spectrum].to(torch.float64)
    A = random_symmetric(n, eigs, seed=5).float()
    lo, hi = float(eigs.min()), float(eigs.max())
    span = hi - lo

    def copies(s):
        return int((np.abs(s.values[0] - hi) < 1e-3 * span).sum())

    full = hesd.slq(A, num_steps=200, num_probes=3, seed=2, lockstep=3)
    for theta in full.values:
        assert abs(theta[-1] - hi) < 1e-6 * span and abs(theta[0] - lo) < 1e-6 * span
    assert [int((np.abs(t - hi) < 1e-3 * span).sum()) for t in full.values] == [1, 1, 1]
    assert copies(hesd.slq(A, num_steps=200, num_probes=1, seed=2, reorth="none")) > 1


def test_plan_basis_fits_budget():
    from hesd.algorithms.slq import plan_basis

    P, steps = 10_000, 100
    assert plan_basis(P, steps, torch.float32, 4 * P * steps)["reorth"] == "full"
    p = plan_basis(P, steps, torch.float32, 2 * P * steps)
    assert p["reorth"] == "full" and p["basis_dtype"] == torch.bfloat16 and p["basis_bytes"] <= 2 * P * steps
    p = plan_basis(P, steps, torch.float32, 4 * P * 10)
    assert p["reorth"] == "window" and p["window"] == 10 and p["basis_bytes"] <= 4 * P * 10


def test_adaptive_slq_stops_early_with_settled_extremes():
    eigs = torch.cat([torch.linspace(-1, 2, 995, dtype=torch.float64), torch.tensor([-4.0, 5.0, 7.0, 8.0, 12.0])])
    A = random_symmetric(1000, eigs, seed=12)
    s = hesd.slq(A, num_steps=300, num_probes=2, seed=1, stop_tol=1e-8)
    assert all(m < 150 for m in s.info["steps_used"])
    assert abs(s.lambda_max - 12) < 1e-6 and abs(s.lambda_min + 4) < 1e-6
    with pytest.raises(ValueError, match="stop_tol must be positive"):
        hesd.slq(A, num_steps=20, stop_tol=0)


@pytest.mark.parametrize(("reorth", "kw"), [("full", {}), ("window", {"window": 4}), ("none", {})])
def test_lockstep_probes_equal_one_at_a_time(reorth, kw):
    """Probes run together (one block product per step) give each probe's own result."""
    eigs = torch.cat([torch.linspace(-1, 2, 295, dtype=torch.float64), torch.tensor([-4.0, 5.0, 7.0, 8.0, 12.0])])
    A = random_symmetric(300, eigs, seed=13)
    one = hesd.slq(A, num_steps=80, num_probes=5, seed=3, reorth=reorth, lockstep=1, stop_tol=1e-6, **kw)
    together = hesd.slq(A, num_steps=80, num_probes=5, seed=3, reorth=reorth, lockstep=3, stop_tol=1e-6, **kw)
    assert one.info["steps_used"] == together.info["steps_used"]
    assert len(set(one.info["steps_used"])) > 1  # probes stopped at different steps and left the block
    assert one.num_matvecs == together.num_matvecs == sum(one.info["steps_used"])
    for a, b, wa, wb in zip(one.values, together.values, one.weights, together.weights, strict=True):
        assert abs(a[0] - b[0]) < 1e-10 and abs(a[-1] - b[-1]) < 1e-10
        if reorth == "full":
            assert np.allclose(a, b, atol=1e-10, rtol=0) and np.allclose(wa, wb, atol=1e-10, rtol=0)
        # Without full re-orthogonalisation the interior (spurious) Ritz values amplify rounding
        # differences between a block and a single product (measured: up to 1e-5 with a window of 4).


def test_lockstep_on_hessian_operator_uses_batched_columns(case):
    name, model, batches, _ = case
    op1 = hesd.HessianOperator(model, torch.nn.functional.cross_entropy, batches)
    op4 = hesd.HessianOperator(model, torch.nn.functional.cross_entropy, batches, batch_columns=4)
    one = hesd.slq(op1, num_steps=12, num_probes=5, seed=2)
    block = hesd.slq(op4, num_steps=12, num_probes=5, seed=2)  # lockstep defaults to batch_columns
    assert block.info["lockstep"] == 4 and one.info["lockstep"] == 1
    for a, b in zip(one.values, block.values, strict=True):
        assert np.allclose(a, b, atol=1e-9 * max(1.0, float(np.abs(a).max())), rtol=0), name
    assert op4.num_matvecs == op1.num_matvecs == 60


def test_lanczos_lockstep_errors():
    A = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"lanczos_lockstep: V0 must have shape \(4, b\)"):
        hesd.algorithms.lanczos_lockstep(A, torch.ones(3, 2, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="should_stop has 1 entries for 2"):
        hesd.algorithms.lanczos_lockstep(A, torch.ones(4, 2, dtype=torch.float64), 2, should_stop=[None])
    with pytest.raises(ValueError, match="finite and non-zero"):
        hesd.algorithms.lanczos_lockstep(A, torch.zeros(4, 2, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="lockstep"):
        hesd.slq(A, num_steps=2, lockstep=0)


@pytest.mark.parametrize(("reorth", "window"), [("full", None), ("window", 3), ("window", 4)])
def test_the_local_pass_reads_q_prev_and_q_in_one_product_unless_a_window_wraps(monkeypatch, reorth, window):
    """``Basis.project``'s first pass multiplies q_{j-1} and q_j together when their slots are adjacent and
    splits where a window wraps between them; the coefficients equal those of a pass per vector (float64)."""
    import sys

    lz = sys.modules["hesd.algorithms.basis"]
    eigs = torch.cat([torch.linspace(-2, 1, 298, dtype=torch.float64), torch.tensor([3.0, 5.0])])
    A = random_symmetric(300, eigs, seed=2)
    v0 = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    widths: list[int] = []
    real = lz.inner
    monkeypatch.setattr(lz, "inner", lambda Q, W: widths.append(Q.shape[1]) or real(Q, W))
    res = hesd.algorithms.lanczos(A, v0, 40, reorth=reorth, window=window)
    size = 40 if window is None else window
    expected = [1, 1]  # step 0: q_0, then the basis (q_0)
    for j in range(1, 40):
        wraps = window is not None and j % size == 0  # q_j in slot 0, q_{j-1} in the last slot
        expected += ([1, 1] if wraps else [2]) + [min(j + 1, size)]
    assert widths[: len(expected)] == expected
    # against the recurrence with one Gram-Schmidt pass per vector (modified), twice, over the same vectors
    Q, alphas, betas = [v0 / v0.norm()], [], []
    for j in range(40):
        w = A @ Q[j]
        kept = Q if window is None else Q[-size:]
        coef = 0.0
        for _ in range(2):
            for q in kept:
                c = q @ w
                w = w - c * q
                coef = coef + c if q is Q[j] else coef
        alphas.append(float(coef))
        if j < 39:
            betas.append(float(w.norm()))
            Q.append(w / w.norm())
    # a window loses orthogonality once λmax converges, and from there rounding differences grow: compare before
    m = 40 if window is None else 10
    assert torch.allclose(res.alpha[:m], torch.tensor(alphas[:m], dtype=torch.float64), rtol=0, atol=1e-10)
    assert torch.allclose(res.beta[:m], torch.tensor(betas[:m], dtype=torch.float64), rtol=0, atol=1e-10)
    T = torch.diag(res.alpha) + torch.diag(res.beta, 1) + torch.diag(res.beta, -1)
    assert abs(torch.linalg.eigvalsh(T)[-1] - 5.0) < 1e-10


class _LowRank(hesd.operators.LinearOperator):
    """``B Bᵀ`` in float32 for a long ``B``, its products accumulated in float64 (hesd.algorithms.inner)."""

    def __init__(self, B: torch.Tensor) -> None:
        self.B, self.shape, self.dtype, self.device = B, (B.shape[0], B.shape[0]), B.dtype, B.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        from hesd.algorithms.inner import columns

        return self.B @ columns(self.B, V).to(self.dtype)


def test_hutchpp_is_exact_on_a_long_float32_low_rank_operator_where_lapacks_qr_alone_is_not(monkeypatch):
    """A rank-3 operator with a 3-column sketch: Hutch++ is exact up to float32 rounding, if its Q is orthonormal.

    LAPACK's float32 QR of 2^23 rows with positive entries leaves Q orthonormal to about 1e-4, and
    tr(QᵀAQ) inherits that; one Cholesky QR step with a float64-accumulated Gram matrix removes it.
    """
    module = importlib.import_module("hesd.algorithms.trace")  # the package's `trace` is the function

    B = torch.rand(1 << 23, 3, generator=torch.Generator().manual_seed(5))
    op = _LowRank(B)
    exact = float((B.double() ** 2).sum())
    err = abs(hesd.trace(op, method="hutchpp", num_matvecs=9).estimate - exact) / exact
    monkeypatch.setattr(module, "_orthonormal", lambda op, Y: torch.linalg.qr(Y))
    lapack = abs(hesd.trace(op, method="hutchpp", num_matvecs=9).estimate - exact) / exact
    print(err, lapack)
    assert err < 1e-6, err
    assert lapack > 10 * err, (lapack, err)


@pytest.mark.parametrize("conditioning", [1.0, 1e-4, 0.0])
def test_the_sketch_is_orthonormalised_within_its_own_span(monkeypatch, conditioning):
    """float32 sketches: Cholesky QR with float64 Gram matrices; LAPACK only where the sketch has lower rank."""
    module = importlib.import_module("hesd.algorithms.trace")
    g = torch.Generator().manual_seed(7)
    n = 3 * (1 << 14) + 11
    U, _ = torch.linalg.qr(torch.randn(n, 4, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    singular = torch.tensor([1.0, 0.3, 1e-2, conditioning], dtype=torch.float64)  # 0.0: rank 3 of 4 columns
    Y = ((U * singular) @ V.T * 1e3).float()
    lapack = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: lapack.append(1) or qr(*a, **k))
    Q, R = module._orthonormal(_LowRank(Y), Y.clone())  # an operator on whole vectors (not sharded)
    assert bool(lapack) == (conditioning == 0.0)
    assert Q.dtype == R.dtype == torch.float32 and Q.shape == (n, 4) and R.shape == (4, 4)
    assert float((Q.double().T @ Q.double() - torch.eye(4, dtype=torch.float64)).abs().max()) < 1e-5
    assert float((Q.double() @ R.double() - Y.double()).norm() / Y.double().norm()) < 1e-6


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp", "auto"])
def test_trace_draws_and_holds_no_more_than_a_chunk_of_probes(monkeypatch, method):
    """Probes are drawn a chunk at a time (60 probes of GPT-2 small: 28 GiB); the estimate does not depend on it."""
    module = importlib.import_module("hesd.algorithms.trace")
    bulk = 0.01 * torch.randn(30, generator=torch.Generator().manual_seed(3))
    eigs = torch.cat([10.0 / torch.arange(1.0, 11.0), bulk])
    A = random_symmetric(40, eigs, seed=3)
    whole = hesd.trace(A, method=method, num_matvecs=30, chunk=30, seed=4)
    widths = []
    draw = module.rademacher
    monkeypatch.setattr(module, "rademacher", lambda n, k, *a, **kw: widths.append(k) or draw(n, k, *a, **kw))
    chunked = hesd.trace(A, method=method, num_matvecs=30, chunk=4, seed=4)
    assert widths and max(widths) <= 4
    assert chunked.method == whole.method and abs(chunked.estimate - whole.estimate) < 1e-12 * abs(whole.estimate)
    assert torch.allclose(chunked.samples, whole.samples, rtol=1e-12, atol=0)
