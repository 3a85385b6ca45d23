r"""A data-parallel operator whose vectors are split across the ranks: the Lanczos basis divided by the world.

Under data parallelism every rank computes its data shard's product and all-reduces it, so each
holds the whole :math:`P`-vector :math:`Hv` — and, running the same Lanczos recurrence, the
whole basis: ``num_steps`` × :math:`P` entries on every rank. :class:`ShardedOperator` views the
same operator with each vector split into ``world`` row blocks of :math:`L = \lceil P / W
\rceil` rows (the last padded with zeros): rank :math:`r` keeps rows :math:`[rL, (r+1)L)` of
every Lanczos vector and basis vector, so the basis memory divides by the world size.

A product gathers the blocks of :math:`v` (``all_gather``), multiplies as before (each rank its
data, then the all-reduce) and keeps its own block of :math:`Hv`: the whole vectors exist only
for the duration of a product. Inner products are partial sums over each rank's rows, summed
over the ranks by :meth:`ShardedOperator.reduce_inner` (one all-reduce of a few numbers), which
the Lanczos recurrence calls for every dot product and norm
(:func:`hesd.algorithms.lanczos_lockstep`). Start vectors are drawn whole and cut
(:meth:`~ShardedOperator.local_rows`), so the probes, the coefficients and the Ritz values are
those of one process, to rounding (tested against one process to 1e-8 with gloo).

Examples:
    Under ``torchrun`` (every rank)::

        H = hesd.HessianOperator(model, loss_fn, my_shard, distributed=True)
        spec = hesd.slq(ShardedOperator(H), num_steps=80, num_probes=3)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..collectives import all_reduce_sum, rank_and_world
from ..errors import HesdValueError
from .linear import LinearOperator

__all__ = ["RankShards", "ShardedOperator"]


class RankShards:
    """What an operator on vectors split across the ranks of ``group`` tells the algorithms.

    A mixin: the class sets ``group`` (the process group) and ``n`` (the whole vector's
    dimension), and defines ``local_rows``.
    """

    group: Any
    n: int

    @property
    def full_dim(self) -> int:
        """:math:`P`, the whole vector's dimension."""
        return self.n

    @property
    def sharded(self) -> bool:
        """Always ``True``: vectors hold this rank's rows."""
        return True

    def reduce_inner(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of partial inner products ``t`` (a new tensor)."""
        return all_reduce_sum(t.clone(), self.group)


class ShardedOperator(RankShards, LinearOperator):
    """``op`` (data parallel, with a ``process_group``) acting on this rank's rows of each vector.

    Args:
        op: an operator whose products are already summed over the ranks of its
            ``process_group`` (:class:`hesd.HessianOperator` with ``process_group=`` or
            ``distributed=True``).

    Attributes:
        shape: ``(L, L)``, :math:`L` rows per rank.
        rows: this rank's rows of the whole vector, a ``slice`` (the padding excluded).

    Raises:
        HesdValueError: ``op`` has no process group.
    """

    def __init__(self, op: LinearOperator) -> None:
        group = getattr(op, "process_group", None)
        if group is None:
            raise HesdValueError(
                "ShardedOperator: the operator has no process_group; build it with process_group=... or "
                "distributed=True under torchrun"
            )
        self.op, self.group = op, group
        self.rank, self.world = rank_and_world(group)
        self.n = op.shape[0]
        self.block = -(-self.n // self.world)
        self.shape = (self.block, self.block)
        self.dtype, self.device = op.dtype, op.device
        lo = min(self.rank * self.block, self.n)
        self.rows = slice(lo, min(lo + self.block, self.n))
        self.default_lockstep = getattr(op, "default_lockstep", 1)

    @property
    def num_matvecs(self) -> int:  # type: ignore[override]
        """Products of the underlying operator."""
        return self.op.num_matvecs

    def local_rows(self, V: torch.Tensor) -> torch.Tensor:
        """This rank's block of rows of whole vectors ``V`` (``(P, k)``), zero-padded to ``L`` rows."""
        out = torch.zeros(self.block, V.shape[1], dtype=V.dtype, device=V.device)
        out[: self.rows.stop - self.rows.start] = V[self.rows]
        return out

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        whole = torch.empty(self.world * self.block, V.shape[1], dtype=V.dtype, device=V.device)
        dist.all_gather_single(whole, V.contiguous(), group=self.group)
        whole = whole[: self.n]
        out = self.op @ whole  # each rank's data, summed over the ranks
        return self.local_rows(out)
