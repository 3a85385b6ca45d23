r"""Inner products of long vectors, accumulated in float64.

Every coefficient of hesd's Krylov methods is an inner product over all :math:`n` parameters:
:math:`\alpha_j = q_j^\top A q_j`, the re-orthogonalisation coefficients :math:`Q^\top w`,
a Rayleigh quotient. On the CPU, BLAS computes a float32 ``dot`` or ``gemv`` in a few
accumulators, each summing :math:`n/\text{lanes}` terms one after another, so its rounding
grows with :math:`n`: over :math:`n = 1.24 \times 10^8` entries (GPT-2 small) a float32 dot of
two unit vectors erred by 3e-3 and a ``gemv`` by 2.4e-2, relative (``tests/algorithms``
pins the effect at a smaller size). The Lanczos coefficients inherited it: Ritz values of GPT-2
small's Hessian on two CPU cores came out 2–4e-4 above its largest eigenvalue, while the
Rayleigh quotient of the returned eigenvector, computed in float64, was below it (BENCHMARKS.md
§9).

:func:`inner` therefore sums in float64 what float32 can sum accurately: on the CPU, BLAS's
float32 ``gemv`` over chunks of ``CHUNK`` (:math:`2^{14}`) entries, the chunks' results added in
float64. Rounding then grows with the chunk, not with :math:`n`. Measured at
:math:`n = 1.24 \times 10^8` with positive uniform entries (the worst case for a long sum): 9.6e-9
relative against float64 for a 6-vector ``gemv`` (a whole-vector float32 ``gemv``: 6.8e-2) and
3.7e-9 for a squared norm (2.6e-3), in 0.21 s against 0.14 s for one float32 ``gemv`` of 6 × 124 M
on two cores (casting every chunk to float64 and multiplying there, as hesd did before, took
0.33–0.75 s). Longer chunks are faster and less accurate: :math:`2^{16}` took 0.15 s at 9.3e-8,
and on the float32 diagonal operator of ``tests/algorithms/test_inner.py`` its restarted Lanczos
ended 7.4e-6 above λmax = 3 against 2.1e-6 with :math:`2^{14}` (and 2.4e-7 below it with float64
casts). The chunks are views cut by one ``split`` call and each ``gemv`` writes into a row of a
float32 buffer that is summed once in float64, so the loop costs one dispatch per chunk (the
7 553 chunks of 124 M entries: 0.065 → 0.051 s for one vector, 0.112 → 0.100 s for three, against
slicing each chunk and adding its result to a float64 row; the same float32 chunk results).
The chunks are shared among PyTorch's intra-op threads (:data:`MAX_THREADS` at most), each writing
its own rows of that buffer, so how the chunks are shared does not change the result; two threads
took 0.059 s against 0.090 s for three vectors at 124 M. With MKL (PyTorch's x86 builds) each loop
thread runs its chunks' ``gemv`` on one MKL thread (``MKL_Set_Num_Threads_Local``, which applies to
the calling thread only; its previous value is restored after): left to itself MKL started a team
of threads inside each loop thread, more threads than cores, and split a chunk among 3 of them
differently than among 2, so the bits depended on ``torch.get_num_threads()``. One MKL thread per
loop thread gives the same bits for any thread count (tested) and, on a 2-core AVX-512 machine,
three vectors of 124 M in 0.092 s instead of 0.117 s, and 30 windowed Lanczos steps beside a free
operator of that size in 13.7–14.3 s instead of 16.7–17.4 s (BENCHMARKS.md §9). Without MKL, BLAS
is left as it is. The loop also pauses Python's garbage collector: its two tensor views per chunk
(15 000 Python objects for three vectors at 124 M) triggered collections, about 0.1 s every few
calls when a full one walked every live object (30 windowed Lanczos steps at 124 M beside a free
operator: 14.2 s of vector work, 11.2 s with the pause, 9.2 s with the threads too; BENCHMARKS.md
§9). The loop's objects hold no reference cycles, so the pause defers no memory.
Other CPU dtypes (bfloat16, float16) are cast to float64 by chunks of at most 16 MiB. On
a GPU the product is taken in the vectors' dtype and only its result is float64: there a chunked
loop would cost kernel launches per chunk, and the float32 recurrence was measured accurate
(GPT-2 small's top eigenvalue in float32 agreed with float64 to 2e-7 on an H200, BENCHMARKS.md
§9); that is a measurement on one model, not a bound. float64 vectors are multiplied directly.

:func:`columns` takes the inner products between the columns of two ``(n, k)`` matrices the same
way, by blocks of :data:`CHUNK` rows (the Gram matrices of Hutch++'s sketch, :mod:`hesd.algorithms.trace`).

Norms need the same care: PyTorch's float32 :func:`torch.linalg.vector_norm` on the CPU erred by
5.4e-4 over :math:`2^{24}` entries and 9.2e-3 over 124 M (uniform entries; a plain ``sum`` was
right to 4e-8), so every Lanczos vector was normalised to a length off by that much and the
Ritz values inflated with it. :func:`norms` is the square root of :func:`inner`.

Examples:
    >>> import torch
    >>> from hesd.algorithms.inner import inner
    >>> Q = torch.tensor([[[1.0, 2.0], [0.0, 1.0]]])  # one recurrence, two basis vectors
    >>> inner(Q, torch.tensor([[3.0, 4.0]])).tolist()
    [[11.0, 4.0]]
"""

from __future__ import annotations

import ctypes
import functools
import gc
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch

__all__ = ["chunk_count", "chunk_loop", "columns", "dots", "inner", "norms"]

#: entries of float32 vectors multiplied by one BLAS call on the CPU (its rounding grows with this length)
CHUNK = 1 << 14

#: bytes of the float64 copy of one chunk of other CPU dtypes (the chunk's length adapts to the rows)
CHUNK_BYTES = 1 << 24

#: at most this many threads share a chunk loop (each holds the interpreter's lock while it dispatches a chunk)
MAX_THREADS = 8

#: and each takes at least this many chunks (below, starting a thread costs more than it saves)
MIN_CHUNKS_PER_THREAD = 64


def inner(Q: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``Q[i] @ W[i]`` for each recurrence ``i``, accumulated in float64 (module docs).

    Args:
        Q: ``(b, k, n)`` — ``k`` vectors for each of ``b`` recurrences.
        W: ``(b, n)`` — one vector per recurrence.

    Returns:
        ``(b, k)`` float64 on ``W``'s device.
    """
    if (Q.dtype == torch.float64 and W.dtype == torch.float64) or W.device.type != "cpu":
        return torch.bmm(Q, W.unsqueeze(2).to(Q.dtype))[:, :, 0].to(torch.float64)
    b, k, n = Q.shape
    if Q.dtype == torch.float32 and W.dtype == torch.float32:
        out = torch.empty(b, k, dtype=torch.float64, device=W.device)
        parts = torch.empty(chunk_count(n), k, dtype=torch.float32, device=W.device)  # a row per split chunk
        for i in range(b):  # one gemv per recurrence and chunk: CPU bmm over b > 1 copies its operands
            _chunk_products(Q[i], W[i], parts)
            out[i] = parts.sum(0, dtype=torch.float64)
        return out
    # the float64 copy of a chunk: at most CHUNK_BYTES, and no more than one of the vectors (so small models'
    # memory plans, which count a few working vectors, hold it)
    chunk = max(256, min(CHUNK_BYTES, n * W.element_size()) // (8 * max(b * k, 1)))
    out = torch.zeros(b, k, dtype=torch.float64, device=W.device)
    for s in range(0, n, chunk):
        out += torch.bmm(Q[:, :, s : s + chunk].double(), W[:, s : s + chunk, None].double())[:, :, 0]
    return out


def _chunk_products(q: torch.Tensor, w: torch.Tensor, parts: torch.Tensor) -> None:
    """``parts[c] = q[:, chunk c] @ w[chunk c]`` for every chunk ``c`` (float32, on the CPU), by :func:`chunk_loop`."""
    nch = parts.shape[0]
    if nch == 1:
        torch.mv(q, w, out=parts[0])
        return

    def work(first: int, stop: int) -> None:
        lo, hi = first * CHUNK, stop * CHUNK
        for part, qc, wc in zip(parts[first:stop].unbind(0), q[:, lo:hi].split(CHUNK, 1), w[lo:hi].split(CHUNK),
                                strict=True):  # fmt: skip
            torch.mv(qc, wc, out=part)  # views made in one call each: the loop is one dispatch per chunk

    chunk_loop(nch, work)


def chunk_count(n: int) -> int:
    """How many chunks of :data:`CHUNK` entries a vector of ``n`` entries splits into (at least one)."""
    return max(1, -(-n // CHUNK))


def chunk_loop(chunks: int, work: Callable[[int, int], None]) -> None:
    """Run ``work(first, stop)`` over ranges of ``chunks`` chunks shared among :func:`_threads` threads.

    Each range is one thread's, which runs its BLAS calls on one MKL thread; every chunk's result
    goes to its own row, so the result does not depend on how many threads ran (module docs).
    Python's garbage collector is paused meanwhile. ``work`` must release Python's lock to run
    side by side (PyTorch's and Numba's ``nogil`` kernels do: :mod:`hesd.algorithms.fused`).

    Args:
        chunks: how many chunks there are.
        work: ``work(first, stop)`` handles chunks ``first`` to ``stop - 1``, writing only their rows.

    Examples:
        >>> import torch
        >>> from hesd.algorithms.inner import chunk_loop
        >>> x, out = torch.arange(8.0), torch.zeros(4)
        >>> chunk_loop(4, lambda a, b: [out.__setitem__(c, x[2 * c : 2 * c + 2].sum()) for c in range(a, b)])
        >>> out.tolist()
        [1.0, 5.0, 9.0, 13.0]
    """
    threads = _threads(chunks)
    bounds = [chunks * t // threads for t in range(threads + 1)]
    local_blas_threads = _mkl_local_threads()

    def run(t: int) -> None:
        before = local_blas_threads(1) if local_blas_threads is not None else None  # this thread's BLAS: one thread
        try:
            work(bounds[t], bounds[t + 1])
        finally:
            if local_blas_threads is not None and before is not None:
                local_blas_threads(before)  # the thread's own again (torch.set_num_threads sets it)

    collecting = gc.isenabled()
    gc.disable()  # the loop's views would trigger collections that walk every live object (module docs)
    try:
        # leaving the block waits for the helpers, which write into the rows, also when the caller's share fails
        with ThreadPoolExecutor(threads - 1) if threads > 1 else nullcontext() as pool:
            helpers = [pool.submit(run, t) for t in range(1, threads)] if pool is not None else []
            run(0)
            for h in helpers:
                h.result()  # a helper's error, raised here
    finally:
        if collecting:
            gc.enable()


def columns(X: torch.Tensor, Y: torch.Tensor | None = None) -> torch.Tensor:
    r"""``X.T @ Y`` for matrices whose columns are long vectors, accumulated in float64 (module docs).

    The inner products of every column of ``X`` with every column of ``Y`` (the Gram matrix
    :math:`X^\top X` without ``Y``), as :func:`inner` takes them: on the CPU, float32 blocks of
    :data:`CHUNK` rows multiplied by BLAS, each block's result added in float64. A float32
    ``X.T @ Y`` over all rows accumulates like a long ``gemv`` (orthonormal columns of 124 M
    entries from a float32 QR were off by 2.8e-3, BENCHMARKS.md §9).

    Args:
        X: ``(n, k)``.
        Y: ``(n, l)`` (default ``X``).

    Returns:
        ``(k, l)`` float64 on ``X``'s device.
    """
    Y = X if Y is None else Y
    if (X.dtype == torch.float64 and Y.dtype == torch.float64) or X.device.type != "cpu":
        return (X.T @ Y.to(X.dtype)).to(torch.float64)
    n, k, m = X.shape[0], X.shape[1], Y.shape[1]
    if X.dtype == torch.float32 and Y.dtype == torch.float32:
        nch = chunk_count(n)
        parts = torch.empty(nch, k, m, dtype=torch.float32, device=X.device)  # a block per chunk of rows

        def work(first: int, stop: int) -> None:
            lo, hi = first * CHUNK, stop * CHUNK
            for part, xc, yc in zip(parts[first:stop].unbind(0), X[lo:hi].split(CHUNK), Y[lo:hi].split(CHUNK),
                                    strict=True):  # fmt: skip
                torch.mm(xc.T, yc, out=part)

        if nch == 1:
            work(0, 1)
        else:
            chunk_loop(nch, work)
        return parts.sum(0, dtype=torch.float64)
    chunk = max(256, CHUNK_BYTES // (8 * max(k + m, 1)))  # rows of both cast to float64 at a time
    out = torch.zeros(k, m, dtype=torch.float64, device=X.device)
    for s in range(0, n, chunk):
        out += X[s : s + chunk].double().T @ Y[s : s + chunk].double()
    return out


@functools.cache
def _mkl_local_threads() -> Callable[[int], int] | None:
    """MKL's ``MKL_Set_Num_Threads_Local`` from PyTorch's CPU library, or ``None`` without MKL.

    It sets how many threads MKL uses for calls made from the calling thread only (0: MKL's
    global setting) and returns the previous setting, which :func:`torch.set_num_threads` sets for
    its calling thread. PyTorch's x86 builds link MKL into ``libtorch_cpu`` and export it; other
    builds (OpenBLAS, Accelerate) lack it, and the chunk loop then leaves BLAS as it is.
    """
    if not torch.backends.mkl.is_available():
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    names = {"linux": "libtorch_cpu.so", "darwin": "libtorch_cpu.dylib", "win32": "torch_cpu.dll"}
    path = lib_dir / names.get(sys.platform, "libtorch_cpu.so")
    try:
        setter = ctypes.CDLL(str(path)).MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None
    setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    return setter


def _threads(chunks: int) -> int:
    """Threads for a chunk loop of ``chunks`` chunks.

    PyTorch's intra-op threads, at most :data:`MAX_THREADS` and at most one per
    :data:`MIN_CHUNKS_PER_THREAD` chunks (short vectors: the caller's thread alone).
    """
    return max(1, min(torch.get_num_threads(), MAX_THREADS, chunks // MIN_CHUNKS_PER_THREAD))


def dots(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products ``X[i] @ Y[i]`` of ``(b, n)`` tensors, accumulated in float64 (module docs); float64."""
    return inner(X.unsqueeze(1), Y)[:, 0]


def norms(X: torch.Tensor) -> torch.Tensor:
    """Euclidean norms of the rows of ``X`` (``(b, n)``), accumulated in float64 (module docs); float64."""
    return torch.sqrt(dots(X, X))
