"""Inner products and norms of long float32 vectors, and the Ritz values that depend on them.

On the CPU, BLAS's float32 dot/gemv and PyTorch's float32 ``vector_norm`` accumulate sequentially
in a few lanes; over millions of entries their error reached 1e-4 to 1e-2 (hesd.algorithms.inner
now sums float32 chunks of 2^14 entries in float64),
and Lanczos normalised its vectors with it: Ritz values of a diagonal operator came out 5e-4
above its largest eigenvalue at 2^24 entries.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import hesd
from hesd.algorithms.inner import CHUNK, columns, inner, norms
from hesd.algorithms.lanczos import as_rows
from hesd.operators.linear import LinearOperator

_mkl_local_threads = importlib.import_module("hesd.algorithms.inner")._mkl_local_threads

N = 1 << 23


def test_inner_and_norms_of_long_float32_vectors_are_accurate_where_one_blas_call_is_not():
    # positive entries: float32 rounding is systematic there, the worst case for a long sum. The length is not a
    # multiple of the chunk, and two recurrences take the per-row path.
    g = torch.Generator().manual_seed(0)
    n = N + 12345
    Q = torch.rand(2, 3, n, generator=g)
    W = torch.rand(2, n, generator=g)
    want = torch.einsum("bkn,bn->bk", Q.double(), W.double())
    got = inner(Q, W)
    assert got.dtype == torch.float64
    err = float(((got - want).abs() / want).max())
    whole = float(((torch.bmm(Q, W[:, :, None])[:, :, 0].double() - want).abs() / want).max())
    assert err < 2e-7, err  # about float32 rounding of the entries themselves (6e-8)
    assert whole > 10 * err, (whole, err)  # one float32 BLAS call over the whole length: what the chunks avoid
    want_norms = W.double().norm(dim=1)
    assert float(((norms(W) - want_norms).abs() / want_norms).max()) < 2e-7
    # mixed signs, against the scale of the terms (the dot itself may be near zero)
    X = Q * 2 - 1
    scale = torch.einsum("bkn,bn->bk", X.double().abs(), W.double())
    assert float(((inner(X, W) - torch.einsum("bkn,bn->bk", X.double(), W.double())).abs() / scale).max()) < 1e-8


@pytest.mark.parametrize("n", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_float32_chunks_cover_every_length(n):
    """Lengths around the chunk size, and empty vectors (an empty shard), for several recurrences."""
    g = torch.Generator().manual_seed(n)
    Q, W = torch.randn(3, 2, n, generator=g), torch.randn(3, n, generator=g)
    got = inner(Q, W)
    assert got.shape == (3, 2) and got.dtype == torch.float64
    want = torch.einsum("bkn,bn->bk", Q.double(), W.double())
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * max(1.0, n**0.5))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_inner_of_other_dtypes_is_float64(dtype):
    g = torch.Generator().manual_seed(2)
    Q, W = torch.randn(1, 2, 5000, generator=g).to(dtype), torch.randn(1, 5000, generator=g).to(dtype)
    want = torch.einsum("bkn,bn->bk", Q.double(), W.double())
    got = inner(Q, W)
    assert got.dtype == torch.float64
    scale = float(torch.einsum("bkn,bn->bk", Q.double().abs(), W.double().abs()).max())
    assert float((got - want).abs().max()) < 1e-9 * scale


def test_operator_outputs_become_rows_with_row_major_strides():
    # (n, 1).T has strides (1, 1), which PyTorch calls contiguous; copying such a row into the basis took the
    # element-by-element path (as_rows' docstring)
    for b in (1, 3):
        Y = torch.randn(1000, b, generator=torch.Generator().manual_seed(b))
        R = as_rows(Y)
        assert R.shape == (b, 1000) and R.stride() == (1000, 1) and torch.equal(R, Y.T)


class _Diagonal(LinearOperator):
    def __init__(self, d: torch.Tensor) -> None:
        self.d, self.shape, self.dtype, self.device = d, (d.numel(), d.numel()), d.dtype, d.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.d[:, None] * V


def test_ritz_values_of_a_long_float32_operator_stay_below_its_largest_eigenvalue():
    # float32 diagonal with spectrum in [-1, 1] plus 3.0 and 2.9: no Ritz value may exceed 3 beyond rounding
    d = torch.rand(N, generator=torch.Generator().manual_seed(1)) * 2 - 1
    d[0], d[1] = 3.0, 2.9
    op = _Diagonal(d)
    top = float(hesd.eigenvalues(op, k=1, tol=1e-6, max_basis=20, warn=False).eigenvalues[0])
    assert abs(top - 3.0) < 3e-6, top
    ritz = float(max(hesd.slq(op, num_steps=20, num_probes=1, seed=0).values[0]))
    assert ritz < 3.0 + 3e-6, ritz
    assert abs(float(hesd.power_iteration(op, k=1, tol=1e-7, max_iter=400, warn=False).eigenvalues[0]) - 3.0) < 3e-6


def test_the_chunk_loop_gives_the_same_bits_on_any_number_of_threads(monkeypatch):
    """Threads share the chunks of a long vector; each chunk's product lands in its own row, summed in one order.

    The number of loop threads is set directly, PyTorch's own left as it is (the next test changes PyTorch's).
    """
    from hesd.algorithms import inner as module

    n = 3 * module.MIN_CHUNKS_PER_THREAD * CHUNK + 77  # up to three threads, a short last chunk
    g = torch.Generator().manual_seed(7)
    Q, W = torch.randn(2, 3, n, generator=g), torch.randn(2, n, generator=g)
    results, used = [], []
    for threads in (1, 2, 3):
        monkeypatch.setattr(module, "_threads", lambda chunks, t=threads: used.append(t) or t)
        results.append(inner(Q, W))
    assert used == [1, 1, 2, 2, 3, 3]  # each recurrence's loop ran on that many threads
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    want = torch.einsum("bkn,bn->bk", Q.double(), W.double())
    assert torch.allclose(results[0], want, rtol=0, atol=1e-5 * n**0.5)


@pytest.mark.skipif(_mkl_local_threads() is None, reason="PyTorch without MKL: BLAS's own threading is left as it is")
def test_the_same_bits_whatever_pytorchs_thread_count_and_mkl_left_as_it_was():
    """With MKL, each loop thread's ``gemv`` runs on one MKL thread, then MKL's per-thread setting is restored.

    Left to itself, MKL split a chunk's ``gemv`` among 3 threads differently than among 1, 2 or 4 (a 2-core
    AVX-512 machine), so the bits depended on ``torch.get_num_threads()``.
    """
    from hesd.algorithms import inner as module

    n = 3 * module.MIN_CHUNKS_PER_THREAD * CHUNK + 77  # up to three loop threads, a short last chunk
    g = torch.Generator().manual_seed(11)
    Q, W = torch.randn(1, 3, n, generator=g), torch.randn(1, n, generator=g)
    setter = _mkl_local_threads()
    before = torch.get_num_threads()
    try:
        results, restored = [], []
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)  # PyTorch sets this thread's MKL setting too
            results.append(inner(Q, W))
            restored.append(setter(threads))  # the setting the loop left: PyTorch's again
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert restored == [1, 2, 3, 4]


def test_the_loop_takes_pytorchs_threads_up_to_its_caps():
    from hesd.algorithms import inner as module

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert module._threads(3 * module.MIN_CHUNKS_PER_THREAD) == 3
        assert module._threads(2 * module.MIN_CHUNKS_PER_THREAD + 1) == 2  # at least MIN_CHUNKS_PER_THREAD each
        assert module._threads(module.MIN_CHUNKS_PER_THREAD - 1) == 1
        torch.set_num_threads(module.MAX_THREADS + 4)
        assert module._threads(100 * module.MIN_CHUNKS_PER_THREAD) == module.MAX_THREADS
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_chunk_loop_pauses_the_garbage_collector_and_restores_it(monkeypatch, enabled):
    import gc

    from hesd.algorithms import inner as module

    seen = []
    mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a, **k: (seen.append(gc.isenabled()), mv(*a, **k))[1])
    (gc.enable if enabled else gc.disable)()
    try:
        x = torch.randn(2 * module.MIN_CHUNKS_PER_THREAD * CHUNK, generator=torch.Generator().manual_seed(8))
        inner(x[None, None], x[None])
        assert gc.isenabled() == enabled
    finally:
        gc.enable()
    assert seen and not any(seen)


def test_an_error_in_a_helper_thread_reaches_the_caller_after_every_thread_ended(monkeypatch):
    import threading

    from hesd.algorithms import inner as module

    mv = torch.mv

    def failing(*a, **k):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("helper failed")
        return mv(*a, **k)

    monkeypatch.setattr(torch, "mv", failing)
    before, running = torch.get_num_threads(), threading.active_count()
    torch.set_num_threads(2)
    try:
        x = torch.randn(2 * module.MIN_CHUNKS_PER_THREAD * CHUNK, generator=torch.Generator().manual_seed(9))
        with pytest.raises(RuntimeError, match="helper failed"):
            inner(x[None, None], x[None])
    finally:
        torch.set_num_threads(before)
    assert threading.active_count() == running


def test_column_products_of_long_float32_matrices_are_accurate_where_one_blas_call_is_not():
    g = torch.Generator().manual_seed(3)
    n = N + 4321  # not a multiple of the chunk
    X, Y = torch.rand(n, 3, generator=g), torch.rand(n, 2, generator=g)  # positive: the worst case for a long sum
    want = X.double().T @ Y.double()
    got = columns(X, Y)
    assert got.dtype == torch.float64 and got.shape == (3, 2)
    err = float(((got - want).abs() / want).max())
    whole = float((((X.T @ Y).double() - want).abs() / want).max())
    assert err < 2e-7, err
    assert whole > 10 * err, (whole, err)  # one float32 BLAS call over all the rows: what the chunks avoid
    gram = columns(X)
    assert torch.equal(gram, gram.T) and float(((gram - X.double().T @ X.double()).abs() / gram).max()) < 2e-7


@pytest.mark.parametrize("n", [0, 1, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_column_products_of_every_length_and_dtype(n, dtype):
    g = torch.Generator().manual_seed(n)
    X, Y = torch.randn(n, 4, generator=g).to(dtype), torch.randn(n, 3, generator=g).to(dtype)
    got = columns(X, Y)
    assert got.shape == (4, 3) and got.dtype == torch.float64
    want = X.double().T @ Y.double()
    tol = 1e-6 * max(1.0, n**0.5) if dtype == torch.float32 else 1e-12 * max(1.0, n)  # float32 chunk results, or exact
    assert torch.allclose(got, want, rtol=0, atol=tol)


def test_column_products_give_the_same_bits_on_any_number_of_threads(monkeypatch):
    from hesd.algorithms import inner as module

    n = 3 * module.MIN_CHUNKS_PER_THREAD * CHUNK + 77
    X = torch.randn(n, 3, generator=torch.Generator().manual_seed(12))
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(module, "_threads", lambda chunks, t=threads: t)
        results.append(columns(X))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
