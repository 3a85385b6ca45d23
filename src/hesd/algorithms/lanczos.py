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

from ..allocator import basis_buffer
from ..checks import check_positive_int
from ..errors import HesdValueError, NonFiniteError
from ..operators.linear import LinearOperator, as_operator
from .inner import dots, inner

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


class _Basis:
    """Lanczos bases of ``b`` recurrences run in lockstep: full, a sliding window, or none.

    Stored as ``(b, size, n)`` in any dtype and on any device; rows of probes that stop are
    dropped (:meth:`keep`) so the active bases stay contiguous.
    """

    def __init__(self, b: int, n: int, m: int, reorth: str, window: int | None, dtype, device, op: LinearOperator):
        self.reorth = reorth
        self.size = {"full": m, "window": window or 0, "none": 0}[reorth]
        self.dtype = dtype or op.dtype
        self.device = torch.device(device) if device is not None else op.device
        self.op_dtype, self.op_device = op.dtype, op.device
        self.reduce = op.reduce_inner  # sums partial inner products over ranks when vectors are sharded
        self.store = basis_buffer((b, self.size, n), self.dtype, self.device) if self.size else None  # hesd.allocator
        self.count = 0

    def add(self, Q: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Store ``Q`` (``(b, n)``), divided row by row by ``scale`` if given, as the latest vectors.

        Returns them as the recurrence should hold them: with :attr:`exact` storage a view of the
        stored copy (no vector of the recurrence's own beside the basis; the division written
        straight into it, one pass fewer); otherwise ``Q``, divided in place.
        """
        if scale is not None and not self.exact:  # (an exact basis always has a store)
            Q = Q.div_(scale[:, None])
        if self.store is None:
            return Q
        slot = self.count % self.size if self.reorth == "window" else self.count
        target = self.store[:, slot]
        if self.exact and scale is not None:
            torch.div(Q, scale[:, None], out=target)
        else:
            target.copy_(Q.to(device=self.device, dtype=self.dtype))
        self.count += 1
        return target if self.exact else Q

    @property
    def exact(self) -> bool:
        """Whether the stored vectors are exact, in the operator's dtype and device.

        A full basis, or a window that holds at least :math:`q_{j-1}` and :math:`q_j`. Then
        :meth:`project` can take the recurrence coefficients from the projection itself.
        """
        stored = self.reorth == "full" or (self.reorth == "window" and self.size >= 2)
        return stored and self.dtype == self.op_dtype and self.device == self.op_device

    def _slot(self, back: int) -> int:
        """The slot of :math:`q_{j-back}` (``back`` = 0: the latest vector added)."""
        i = self.count - 1 - back
        return i % self.size if self.reorth == "window" else i

    def orthogonalise(self, W: torch.Tensor) -> torch.Tensor:
        """Remove from each row of ``W`` (``(b, n)``) its components along that probe's basis."""
        if self.store is None or self.count == 0:
            return W
        Q = self.store[:, : min(self.count, self.size)].to(device=self.op_device, dtype=self.op_dtype)
        for _ in range(2):  # classical Gram-Schmidt twice ("twice is enough")
            _subtract(W, Q, self.reduce(inner(Q, W)))
        return W

    def project(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Full re-orthogonalisation that also yields :math:`\alpha_j` (only when :attr:`exact`).

        Gram-Schmidt twice on :math:`w = A q_j`, the first pass local, the second over every
        stored vector (the whole basis, or with ``reorth="window"`` the window):

        1. against :math:`q_{j-1}` and :math:`q_j` together (classical Gram-Schmidt on two
           orthonormal vectors; two passes where a window wraps between their slots):
           coefficients :math:`h`, whose last entry is :math:`\alpha_j = q_j^\top A q_j` (the
           other is :math:`\beta_{j-1}`). This is the three-term recurrence written as a
           projection. Along every older :math:`q_i`,
           :math:`q_i^\top A q_j = (A q_i)^\top q_j` is of order :math:`\epsilon\|A\|`,
           because :math:`A q_i` lies in :math:`\operatorname{span}(q_0 \dots q_{i+1})` up to the
           rounding that step :math:`i` removed.
        2. against the whole basis :math:`Q_j = [q_0 \dots q_j]`: removes those rounding-level
           components and the first pass's own rounding; its last coefficient corrects
           :math:`\alpha_j`.

        The second pass's input is therefore orthogonal to :math:`Q_j` to a relative
        :math:`\epsilon\|A\|/\beta_j`, at most about 1 % while :math:`\beta_j` is above the
        breakdown threshold :math:`100\,\epsilon\,\|T\|`, so one full pass restores
        orthogonality to rounding ("twice is enough" needs a nearly orthogonal input, not a
        full first pass; ``tests/algorithms`` checks the orthogonality on hard float32 spectra).

        Cost: two reads of the stored basis a step instead of four, in 4 tensor operations (6 where a
        window wraps between the slots of :math:`q_{j-1}` and :math:`q_j`; BENCHMARKS.md §5).

        Returns the orthogonalised ``W`` and ``alpha``.
        """
        assert self.store is not None  # project() runs only with stored vectors (exact)
        first = self._slot(min(self.count - 1, 1))  # q_{j-1} (or q_0 at the start) to q_j: the O(1) components
        for lo, hi in ((first, self._slot(0) + 1),) if first <= self._slot(0) else ((first, first + 1), (0, 1)):
            q = self.store[:, lo:hi]  # adjacent slots in one pass; a window that wraps between them in two
            h = self.reduce(inner(q, W))  # float64; the last, along q_j, is alpha_j
            _subtract(W, q, h)
        Q = self.store[:, : min(self.count, self.size)]  # the whole basis, or the window
        h2 = self.reduce(inner(Q, W))
        _subtract(W, Q, h2)
        return W, (h[:, -1] + h2[:, self._slot(0)])

    def keep(self, rows: torch.Tensor) -> None:
        if self.store is not None:
            self.store = self.store[rows.to(self.device)]


def row_norms(X: torch.Tensor, op: LinearOperator) -> torch.Tensor:
    """Row norms of ``X`` in its dtype, accumulated in float64 (:mod:`hesd.algorithms.inner`).

    For sharded vectors, the square root of the partial squares summed over the ranks
    (``op.reduce_inner`` is the identity otherwise).
    """
    return torch.sqrt(op.reduce_inner(dots(X, X))).to(X.dtype)


def _subtract(W: torch.Tensor, Q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``W[i] -= Q[i]ᵀ h[i]`` for each row ``i``, in place (``W`` ``(b, n)``, ``Q`` ``(b, k, n)``, ``h`` ``(b, k)``).

    One ``addmv_`` per row: ``baddbmm_`` on the CPU computes into a new vector-sized buffer and
    copies it back, which at 124 M parameters costs more than the product it replaces.
    """
    h = h.to(W.dtype)
    for i in range(W.shape[0]):
        W[i].addmv_(Q[i].T, h[i], alpha=-1)
    return W


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
    basis = _Basis(b, n, num_steps, reorth, window, basis_dtype, basis_device, op)
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
        if exact:
            W, alpha = basis.project(W)
        else:
            alpha = op.reduce_inner(dots(Q, W))
            W.addcmul_(Q, alpha[:, None].to(W.dtype), value=-1)
            assert Q_prev is not None  # held when not exact
            W.addcmul_(Q_prev, beta_prev[:, None].to(W.dtype), value=-1)
            W = basis.orthogonalise(W)
        beta = row_norms(W, op)
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
