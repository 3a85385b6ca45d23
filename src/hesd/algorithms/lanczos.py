r"""Lanczos tridiagonalisation of symmetric operators, one recurrence or several in lockstep.

:func:`lanczos` builds the tridiagonal :math:`T_m = Q_m^\top A Q_m` of the Krylov space
:math:`\mathcal{K}_m(A, v_0)`; :func:`lanczos_lockstep` runs independent recurrences together so
that one operator call multiplies a block of vectors. :func:`hesd.eigenvalues`
(:mod:`hesd.algorithms.eigen`) restarts Lanczos for extreme eigenpairs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import check_positive_int
from ..errors import HesdValueError, NonFiniteError
from ..operators.linear import LinearOperator, as_operator
from .basis import Basis
from .inner import dots

__all__ = ["LanczosResult", "as_rows", "lanczos", "lanczos_lockstep", "row_norms", "writable"]

# _IN_PLACE: every vector-sized update of a step is made in place. On the CPU each fresh temporary
# of a large model's size is mapped, faulted in and unmapped (above glibc's largest mmap threshold,
# 32 MiB): 3 s of vector work per step at 124 M parameters against 0.2 s in place (BENCHMARKS.md §9).


@dataclass
class LanczosResult:
    r"""Output of :func:`lanczos`.

    Attributes:
        alpha: ``(m,)`` diagonal of the tridiagonal, float64 on the CPU.
        beta: ``(m - 1,)`` off-diagonal.
        residual_norm: :math:`\\beta_m`, the norm of the remainder after the last step.
        broke_down: True if the Krylov space became invariant before ``num_steps``
            (then ``m < num_steps`` and the Ritz values are exact eigenvalues).
        num_matvecs: products used.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    residual_norm: float
    broke_down: bool
    num_matvecs: int


def row_norms(X: torch.Tensor, op: LinearOperator) -> torch.Tensor:
    """Row norms of ``X`` in its dtype, accumulated in float64 (:mod:`hesd.algorithms.inner`).

    For sharded vectors, the square root of the partial squares summed over the ranks
    (``op.reduce_inner`` is the identity otherwise).
    """
    return torch.sqrt(op.reduce_inner(dots(X, X))).to(X.dtype)


def _takes_residual(stop: Callable[..., bool]) -> bool:
    r"""Whether ``stop`` takes a third positional argument (the residual norm :math:`\beta_j`)."""
    try:
        inspect.signature(stop).bind([], [], 0.0)
    except (TypeError, ValueError):  # ValueError: no signature to read (some builtins)
        return False
    return True


def as_rows(Y: torch.Tensor) -> torch.Tensor:
    """The columns of ``Y`` (``(n, b)``) as the rows of a ``(b, n)`` tensor with strides ``(n, 1)``.

    ``Y.T.contiguous()`` is not enough: for ``b = 1`` it returns ``Y.T`` itself, whose strides are
    ``(1, 1)`` (PyTorch calls any stride of a size-1 dimension contiguous), and copying such a row
    into the basis took PyTorch's element-by-element path: 0.5 s instead of 0.03 s for a 124 M-entry
    vector on two cores, more than half of a windowed Lanczos step's vector work (BENCHMARKS.md §9).
    """
    b, n = Y.shape[1], Y.shape[0]
    return Y.T.contiguous().view(b, n)


def writable(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``W`` (an operator's output), ready to be updated in place.

    Copied only if it shares memory with the operator's input ``Q`` (an operator may return its
    input, e.g. the identity).
    """
    return W.clone() if W.untyped_storage().data_ptr() == Q.untyped_storage().data_ptr() else W


def lanczos(
    A: Any,
    v0: torch.Tensor,
    num_steps: int,
    *,
    reorth: str = "full",
    window: int | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: str | torch.device | None = None,
    breakdown_tol: float | None = None,
    callback: Callable[[int], None] | None = None,
    should_stop: Callable[..., bool] | None = None,
) -> LanczosResult:
    r"""Run ``num_steps`` of the Lanczos recurrence from ``v0``.

    .. math::  \beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1}

    Args:
        A: symmetric operator, tensor or SciPy operator.
        v0: start vector (normalised here).
        num_steps: number of products (at most the dimension).
        reorth: ``"full"`` — re-orthogonalise against every basis vector (memory
            ``num_steps × n`` entries of ``basis_dtype``: e.g. 100 steps of a 1 M-parameter
            model in float32 take 400 MB); ``"window"`` — against the last ``window`` vectors
            only (memory ``window × n``; as LLA does, loses orthogonality and creates spurious
            copies of converged Ritz values); ``"none"`` — three-term recurrence only.
        window: window size for ``reorth="window"``.
        basis_dtype: dtype to store the basis in (``torch.bfloat16`` or ``torch.float16`` halves
            the memory at the cost of orthogonality near that precision).
        basis_device: where to store the basis (``"cpu"`` moves it off the GPU).
        breakdown_tol: stop when :math:`\beta_j` falls below this; default
            :math:`100\,\epsilon\,\|T\|`.
        callback: called with the step index after each step (progress bars).
        should_stop: ``should_stop(alphas, betas)`` after each step (``len(betas) ==
            len(alphas) - 1``); ``True`` ends the recurrence early (adaptive SLQ). With a third
            parameter it also gets :math:`\beta_j`, the norm of the remainder (Ritz residuals
            :math:`\beta_j |s_{j,i}|`; :func:`hesd.eigenvalues` with ``reorth="window"``).

    Returns:
        :class:`LanczosResult` with float64 coefficients.

    Examples:
        >>> import torch, hesd
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> r = hesd.algorithms.lanczos(A, torch.ones(3, dtype=torch.float64), 3)
        >>> round(float(r.alpha[0]), 12)  # the Rayleigh quotient of the start vector
        2.0
    """
    caller = "lanczos"
    op = as_operator(A, caller)
    v0 = torch.as_tensor(v0)
    if v0.dim() != 1 or v0.shape[0] != op.shape[0]:
        raise HesdValueError(f"{caller}: v0 must be a vector of length {op.shape[0]}, got shape {tuple(v0.shape)}")
    return lanczos_lockstep(
        op,
        v0[:, None],
        num_steps,
        reorth=reorth,
        window=window,
        basis_dtype=basis_dtype,
        basis_device=basis_device,
        breakdown_tol=breakdown_tol,
        callback=(lambda p, j: callback(j)) if callback is not None else None,
        should_stop=[should_stop],
    )[0]


def lanczos_lockstep(
    A: Any,
    V0: torch.Tensor,
    num_steps: int,
    *,
    reorth: str = "full",
    window: int | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: str | torch.device | None = None,
    breakdown_tol: float | None = None,
    callback: Callable[[int, int], None] | None = None,
    should_stop: Sequence[Callable[..., bool] | None] | None = None,
) -> list[LanczosResult]:
    r"""Run independent Lanczos recurrences from the ``b`` columns of ``V0`` in lockstep.

    Each step multiplies the operator by all still-running Lanczos vectors at once
    (``A @ Q`` with ``Q`` of shape ``(n, b)``), so an operator that batches columns
    (:class:`hesd.HessianOperator` with ``batch_columns > 1``, e.g. on a GPU) does one
    batched pass per step instead of ``b``. The recurrences do not interact: each column's
    result equals :func:`lanczos` from that column, to rounding (tested). A recurrence that
    breaks down or whose ``should_stop`` fires leaves the block; the others go on.

    Args:
        A: symmetric operator, tensor or SciPy operator.
        num_steps: Lanczos steps per recurrence.
        reorth: as for :func:`lanczos`.
        window: as for :func:`lanczos`.
        basis_dtype: as for :func:`lanczos` (the basis memory is ``b`` times that of one recurrence).
        basis_device: as for :func:`lanczos`.
        breakdown_tol: as for :func:`lanczos`.
        V0: ``(n, b)`` start vectors, one per column (each normalised here).
        callback: ``callback(column, step)`` after each step of each recurrence.
        should_stop: one per column (or ``None``), as for :func:`lanczos`.

    Returns:
        one :class:`LanczosResult` per column, in column order.
    """
    caller = "lanczos_lockstep"
    op = as_operator(A, caller)
    n = op.shape[0]
    check_positive_int(num_steps, "num_steps", caller)
    if reorth not in ("full", "window", "none"):
        raise HesdValueError(f"{caller}: reorth must be 'full', 'window' or 'none', got {reorth!r}")
    if reorth == "window":
        check_positive_int(window, "window", caller)
    if V0.dim() != 2 or V0.shape[0] != n or V0.shape[1] == 0:
        raise HesdValueError(f"{caller}: V0 must have shape ({n}, b) with b >= 1, got {tuple(V0.shape)}")
    b = V0.shape[1]
    stops = list(should_stop) if should_stop is not None else [None] * b
    if len(stops) != b:
        raise HesdValueError(f"{caller}: should_stop has {len(stops)} entries for {b} start vectors")
    with_residual = [stop is not None and _takes_residual(stop) for stop in stops]
    num_steps = min(num_steps, op.full_dim)
    eps = torch.finfo(op.dtype).eps
    basis = Basis(b, n, num_steps, reorth, window, basis_dtype, basis_device, op)
    exact = basis.exact
    Q = as_rows(V0.to(device=op.device, dtype=op.dtype))
    norms = row_norms(Q, op)
    if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
        raise HesdValueError(f"{caller}: start vectors must be finite and non-zero")
    Q = Q / norms[:, None]
    Q_prev: torch.Tensor | None = None if exact else torch.zeros_like(Q)
    beta_prev = torch.zeros(b, dtype=op.dtype, device=op.device)
    active = list(range(b))
    alphas: list[list[float]] = [[] for _ in range(b)]
    betas: list[list[float]] = [[] for _ in range(b)]
    anorm = [0.0] * b
    last_beta = [0.0] * b
    broke = [False] * b
    scale: torch.Tensor | None = None  # Q's row norms, divided out as it is stored (None: Q is normalised)
    for j in range(num_steps):
        Q = basis.add(Q, scale)  # exact storage: a view of the basis, and Q's own memory is freed (_IN_PLACE)
        W = writable(as_rows(op @ Q.T), Q)  # updated in place below (_IN_PLACE)
        beta: torch.Tensor | None = None
        if exact:
            W, alpha, beta = basis.project(W)  # beta: where the compiled step took it (hesd.algorithms.fused)
        else:
            alpha = op.reduce_inner(dots(Q, W))
            W.addcmul_(Q, alpha[:, None].to(W.dtype), value=-1)
            assert Q_prev is not None  # held when not exact
            W.addcmul_(Q_prev, beta_prev[:, None].to(W.dtype), value=-1)
            W = basis.orthogonalise(W)
        beta = row_norms(W, op) if beta is None else beta
        keep: list[int] = []
        for row, (p, a, bt) in enumerate(zip(active, alpha.tolist(), beta.tolist(), strict=True)):
            if not math.isfinite(bt) or not math.isfinite(a):
                raise NonFiniteError(f"{caller}: a product returned NaN/inf at step {j}; check the operator")
            alphas[p].append(a)
            prev = betas[p][-1] if betas[p] else 0.0
            anorm[p] = max(anorm[p], abs(a) + bt + prev)
            last_beta[p] = bt
            if callback is not None:
                callback(p, j)
            tol = breakdown_tol if breakdown_tol is not None else 100 * eps * max(anorm[p], 1e-300)
            if j == num_steps - 1:
                continue
            if bt <= tol:
                broke[p] = True
                continue
            stop = stops[p]
            if stop is not None and (stop(alphas[p], betas[p], bt) if with_residual[p] else stop(alphas[p], betas[p])):
                continue
            betas[p].append(bt)
            keep.append(row)
        if not keep:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep, dtype=torch.long, device=op.device)
            W, beta = W[rows], beta[rows]
            if not exact:
                Q = Q[rows]
            basis.keep(rows)
            active = [active[r] for r in keep]
        # exact: the projection reads q_{j-1} from the basis, so no previous vector is held
        Q_prev, Q, scale, beta_prev = (None if exact else Q), W, beta, beta  # q_{j+1} = W / beta, in add
        del W  # Q's only name: exact storage frees it once the basis holds q_{j+1}
    return [
        LanczosResult(
            alpha=torch.tensor(alphas[p], dtype=torch.float64),
            beta=torch.tensor(betas[p], dtype=torch.float64),
            residual_norm=0.0 if broke[p] else last_beta[p],
            broke_down=broke[p],
            num_matvecs=len(alphas[p]),
        )
        for p in range(b)
    ]
