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

:func:`inner` therefore accumulates in float64: on the CPU by chunks of a few thousand to a
few hundred thousand entries (each chunk cast to float64 and multiplied there, the chunks
summed in float64; the cast chunk is at most 16 MiB and one vector's bytes), which costs about
1.7 times a float32 ``gemv`` and is exact to float64 rounding. On a GPU the product is taken in
the vectors' dtype and only its result is float64: there a chunked loop would cost kernel
launches per chunk, and the float32 recurrence was measured accurate (GPT-2 small's top
eigenvalue in float32 agreed with float64 to 2e-7 on an H200, BENCHMARKS.md §9); that is a
measurement on one model, not a bound. float64 vectors are multiplied directly.

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

import torch

__all__ = ["inner", "norms"]

#: bytes of the float64 copy of one chunk on the CPU (the chunk's length adapts to the rows)
CHUNK_BYTES = 1 << 24


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
    # the float64 copy of a chunk: at most CHUNK_BYTES, and no more than one of the vectors (so small models'
    # memory plans, which count a few working vectors, hold it)
    chunk = max(256, min(CHUNK_BYTES, n * W.element_size()) // (8 * max(b * k, 1)))
    out = torch.zeros(b, k, dtype=torch.float64, device=W.device)
    for s in range(0, n, chunk):
        out += torch.bmm(Q[:, :, s : s + chunk].double(), W[:, s : s + chunk, None].double())[:, :, 0]
    return out


def norms(X: torch.Tensor) -> torch.Tensor:
    """Euclidean norms of the rows of ``X`` (``(b, n)``), accumulated in float64 (module docs); float64."""
    return torch.sqrt(inner(X.unsqueeze(1), X)[:, 0])
