r"""The Lanczos basis: stored vectors and the re-orthogonalisation of each new product against them.

:class:`Basis` holds the bases of ``b`` recurrences run in lockstep
(:func:`hesd.algorithms.lanczos_lockstep`): every vector (``reorth="full"``), a sliding window of
the latest (``"window"``), or none. Where the stored vectors are exact (the operator's dtype and
device), :meth:`Basis.project` re-orthogonalises by Gram-Schmidt twice and yields the recurrence's
coefficients; on the CPU in float32 with Numba installed it does so in three compiled sweeps
(:mod:`hesd.algorithms.fused`), and the last, the subtraction of the second pass, is written
straight into the basis by :meth:`Basis.add`.
"""

from __future__ import annotations

import torch

from ..allocator import basis_buffer
from ..operators.linear import LinearOperator
from . import fused
from .inner import inner

__all__ = ["Basis", "pythagoras"]

#: the compiled step's :math:`\beta_j` from Pythagoras holds while the second pass removes at most this
#: share of :math:`\|w\|^2` (rounding size away from breakdown); above it the norm is taken explicitly
PYTHAGORAS_LIMIT = 1e-2


class Basis:
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
        self.pending: torch.Tensor | None = None  # the compiled step's second-pass coefficients, subtracted in add

    def add(self, Q: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Store ``Q`` (``(b, n)``), divided row by row by ``scale`` if given, as the latest vectors.

        Returns them as the recurrence should hold them: with :attr:`exact` storage a view of the
        stored copy (no vector of the recurrence's own beside the basis; the division written
        straight into it, one pass fewer); otherwise ``Q``, divided in place. After a compiled
        :meth:`project`, ``Q`` still lacks the second pass's subtraction, made here in the same sweep.
        """
        if scale is not None and not self.exact:  # (an exact basis always has a store)
            Q = Q.div_(scale[:, None])
        if self.store is None:
            return Q
        slot = self.count % self.size if self.reorth == "window" else self.count
        target = self.store[:, slot]
        if self.pending is not None and scale is not None:  # the compiled step's last sweep (fused.subtract_into)
            filled = range(self.pending.shape[1])
            for i in range(Q.shape[0]):
                fused.subtract_into(self.store[i], filled, self.pending[i], Q[i], slot, float(scale[i]))
        elif self.exact and scale is not None:
            torch.div(Q, scale[:, None], out=target)
        else:
            target.copy_(Q.to(device=self.device, dtype=self.dtype))
        self.pending = None
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

    def _local(self) -> tuple[int, int]:
        """The slots of :math:`q_{j-1}` (:math:`q_0` at the start) and :math:`q_j`, the first pass's vectors."""
        return self._slot(min(self.count - 1, 1)), self._slot(0)

    def orthogonalise(self, W: torch.Tensor) -> torch.Tensor:
        """Remove from each row of ``W`` (``(b, n)``) its components along that probe's basis."""
        if self.store is None or self.count == 0:
            return W
        Q = self.store[:, : min(self.count, self.size)].to(device=self.op_device, dtype=self.op_dtype)
        for _ in range(2):  # classical Gram-Schmidt twice ("twice is enough")
            _subtract(W, Q, self.reduce(inner(Q, W)))
        return W

    def project(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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

        On the CPU in float32 with Numba the same two passes take three compiled sweeps
        (:mod:`hesd.algorithms.fused`): the second pass's subtraction is left to :meth:`add`, and
        :math:`\beta_j` comes from Pythagoras while the second pass removes at most
        :data:`PYTHAGORAS_LIMIT` of :math:`\|w\|^2`.

        Returns ``W`` (orthogonalised, or awaiting :meth:`add`'s subtraction), ``alpha``, and
        :math:`\beta_j` where the compiled step took it (``None``: take ``W``'s norm).
        """
        assert self.store is not None  # project() runs only with stored vectors (exact)
        if fused.usable(self.store, W):
            return self._project_compiled(W)
        first, last = self._local()  # q_{j-1} to q_j: the O(1) components
        for lo, hi in ((first, last + 1),) if first <= last else ((first, first + 1), (0, 1)):
            q = self.store[:, lo:hi]  # adjacent slots in one pass; a window that wraps between them in two
            h = self.reduce(inner(q, W))  # float64; the last, along q_j, is alpha_j
            _subtract(W, q, h)
        Q = self.store[:, : min(self.count, self.size)]  # the whole basis, or the window
        h2 = self.reduce(inner(Q, W))
        _subtract(W, Q, h2)
        return W, (h[:, -1] + h2[:, last]), None

    def _project_compiled(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`project` in :mod:`hesd.algorithms.fused`'s sweeps (one recurrence after another)."""
        assert self.store is not None
        first, last = self._local()
        local = [first, last] if first != last else [last]  # q_{j-1}, q_j in any slots: one pass
        filled = range(min(self.count, self.size))
        h = self.reduce(torch.stack([fused.products(self.store[i], local, W[i]) for i in range(W.shape[0])]))
        r = self.reduce(torch.stack([
            fused.subtract_then_products(self.store[i], local, h[i], filled, W[i]) for i in range(W.shape[0])
        ]))  # fmt: skip
        h2 = r[:, :-1]
        alpha = h[:, -1] + h2[:, last]
        beta_sq = pythagoras(h2, r[:, -1])
        if beta_sq is not None:
            self.pending = h2
            return W, alpha, torch.sqrt(beta_sq).to(W.dtype)
        _subtract(W, self.store[:, : len(filled)], h2)  # near breakdown: the norm taken explicitly
        return W, alpha, None

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the recurrences ``rows`` (the others stopped)."""
        if self.store is not None:
            self.store = self.store[rows.to(self.device)]
        if self.pending is not None:
            self.pending = self.pending[rows.to(self.pending.device)]


def pythagoras(h2: torch.Tensor, wsq: torch.Tensor) -> torch.Tensor | None:
    r""":math:`\beta^2 = \|w\|^2 - \|h_2\|^2` for each recurrence, if the compiled step may take it so.

    ``h2`` (``(..., k)``) are the second pass's coefficients and ``wsq`` (``(...)``) the squared
    norms of :math:`w` before that pass's subtraction. Pythagoras holds while every recurrence's
    second pass removes at most :data:`PYTHAGORAS_LIMIT` of :math:`\|w\|^2`; otherwise (near
    breakdown, or not finite: the comparison is false for NaN) ``None``, and the caller subtracts
    the second pass and takes the norm explicitly.
    """
    removed = (h2 * h2).sum(-1)
    if bool((removed <= PYTHAGORAS_LIMIT * wsq).all()):
        return wsq - removed
    return None


def _subtract(W: torch.Tensor, Q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``W[i] -= Q[i]ᵀ h[i]`` for each row ``i``, in place (``W`` ``(b, n)``, ``Q`` ``(b, k, n)``, ``h`` ``(b, k)``).

    One ``addmv_`` per row: ``baddbmm_`` on the CPU computes into a new vector-sized buffer and
    copies it back, which at 124 M parameters costs more than the product it replaces.
    """
    h = h.to(W.dtype)
    for i in range(W.shape[0]):
        W[i].addmv_(Q[i].T, h[i], alpha=-1)
    return W
