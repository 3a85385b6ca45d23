"""Data-parallel and task-parallel analysis on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Three ways to spread the work over ``world`` processes (launch with ``torchrun`` or
``torch.multiprocessing.spawn``):

* **data parallel** — ``HessianOperator(..., process_group=...)``: each rank holds a shard of
  the data; every Hessian-vector product is the sample-count-weighted all-reduce of the
  ranks' partial products, so every rank sees the Hessian of the whole data set and runs the
  same (deterministic) algorithm. Use it when the data is large: one HVP costs
  ``1/world`` of the data per rank plus one all-reduce of ``P`` numbers.
* **probe parallel** — :func:`slq_probe_parallel`: every rank holds all the data and runs its
  own SLQ probes; the Ritz values are gathered. No communication per HVP; use it when many
  probes are wanted and the data fits each rank.
* **checkpoint parallel** — ``hesd.analyze_checkpoints(..., process_group=..., parallel="checkpoints")``:
  ranks take checkpoints round-robin; rank 0 stores rows after each round. Best scaling for
  long series (no communication while analysing).

Only rank 0 writes files. A rank that fails makes every rank raise
:class:`DistributedError` naming the failing rank (no hang), as long as the failure happens
at a point where ranks agree (:func:`agree`); the process group's timeout bounds the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from .collectives import DistributedError, agree, broadcast, consensus, rank_and_world, resolve_group
from .errors import HesdTypeError

__all__ = [
    "DistributedError",
    "agree",
    "broadcast",
    "consensus",
    "rank_and_world",
    "resolve_group",
    "shard",
    "slq_probe_parallel",
]


def shard(data: Iterable, rank: int | None = None, world: int | None = None, group: Any = None) -> list:
    """Batches ``i`` with ``i % world == rank`` (round-robin by batch; shards may differ in size).

    A one-batch data set is split by samples instead. With ``rank``/``world`` unset they
    come from ``group`` (or the default group).
    """
    from .operators.data import is_single_batch

    if rank is None or world is None:
        g = (
            group
            if group is not None
            else (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        )
        rank, world = rank_and_world(g)
    if is_single_batch(data):
        X, y = data
        n = len(y)
        idx = torch.arange(rank, n, world)
        pick = (lambda t: t[idx]) if isinstance(X, torch.Tensor) else None
        if pick is None:
            raise HesdTypeError("shard: a single batch must hold tensors to be split by samples")
        return [(pick(X), y[idx])]
    return [b for i, b in enumerate(data) if i % world == rank]


def _iter_local(items: list, rank: int, world: int) -> Iterator[tuple[int, Any]]:
    for i, item in enumerate(items):
        if i % world == rank:
            yield i, item


def slq_probe_parallel(A: Any, num_steps: int, num_probes: int, *, group: Any = True, seed: int = 0, **kw):
    """SLQ with probes spread over ranks; every rank returns the same full :class:`hesd.Spectrum`.

    ``A`` must be a *local* operator (each rank holding all the data). Probe ``p`` runs on
    rank ``p % world``; its probe vector is the one :func:`hesd.slq` would use for ``p``,
    so the result equals the single-process ``slq`` exactly.
    """
    from .algorithms.lanczos import lanczos
    from .algorithms.probes import rademacher
    from .algorithms.slq import ritz_from_tridiagonal
    from .algorithms.spectrum import Spectrum
    from .operators.linear import as_operator

    group = resolve_group(group)
    rank, world = rank_and_world(group)
    op = as_operator(A, "slq_probe_parallel")
    n = op.shape[0]
    mine: list[tuple[int, list, list, bool, int]] = []
    error = None
    try:
        for p, _ in _iter_local(list(range(num_probes)), rank, world):
            v0 = rademacher(n, 1, seed, op.dtype, op.device, offset=p)[:, 0]
            res = lanczos(op, v0, num_steps, **kw)
            theta, w = ritz_from_tridiagonal(res.alpha.numpy(), res.beta.numpy())
            mine.append((p, theta.tolist(), w.tolist(), res.broke_down, res.num_matvecs))
    except Exception as exc:
        error = exc
    agree(group, error, "slq_probe_parallel")
    gathered: list[Any] = [None] * world
    if group is None:
        gathered = [mine]
    else:
        dist.all_gather_object(gathered, mine, group=group)
    allp = sorted((x for part in gathered for x in part), key=lambda t: t[0])
    spec = Spectrum.from_ritz([t[1] for t in allp], [t[2] for t in allp], dim=n)
    spec.broke_down = [t[3] for t in allp]
    spec.num_matvecs = sum(t[4] for t in allp)
    spec.info = {"num_steps": num_steps, "num_probes": num_probes, "seed": seed, "parallel": "probes", "world": world}
    return spec
