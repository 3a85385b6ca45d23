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

from .errors import HesdError

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


class DistributedError(HesdError, RuntimeError):
    """A rank failed; raised on every rank so the job stops together."""


def resolve_group(process_group: Any) -> Any:
    """``True`` → the default group; ``None``/``False`` → no group; a group is returned as is."""
    if process_group is None or process_group is False:
        return None
    if process_group is True:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "process_group=True needs torch.distributed to be initialised: call "
                "torch.distributed.init_process_group(...) first (torchrun sets the environment)"
            )
        return dist.group.WORLD
    return process_group


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` without distributed."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def agree(group: Any, error: BaseException | None, what: str) -> None:
    """Collective: every rank reports whether ``what`` succeeded; if any failed, all raise.

    Args:
        group: the process group (``None``: re-raise ``error`` locally).
        error: this rank's exception, or ``None``.
        what: what was being done, for the message.
    """
    if group is None:
        if error is not None:
            raise error
        return
    _, world = rank_and_world(group)
    mine = None if error is None else f"{type(error).__name__}: {error}"
    statuses: list[Any] = [None] * world
    dist.all_gather_object(statuses, mine, group=group)
    failed = [(r, m) for r, m in enumerate(statuses) if m is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
        err = DistributedError(f"{what} failed on {len(failed)} of {world} ranks ({detail}); every rank stops")
        if error is not None and isinstance(error, HesdError):
            err.__cause__ = error
        raise err


def consensus(group: Any, error: BaseException | None) -> str | None:
    """Collective: ``None`` if every rank succeeded, else one message naming the failed ranks."""
    if group is None:
        return None if error is None else f"{type(error).__name__}: {error}"
    _, world = rank_and_world(group)
    mine = None if error is None else f"{type(error).__name__}: {error}"
    statuses: list[Any] = [None] * world
    dist.all_gather_object(statuses, mine, group=group)
    failed = [(r, m) for r, m in enumerate(statuses) if m is not None]
    if not failed:
        return None
    if len(failed) == world and len({m for _, m in failed}) == 1:
        return failed[0][1]
    return "; ".join(f"rank {r}: {m}" for r, m in failed)


def broadcast(obj: Any, group: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (identity without a group)."""
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src) if group is not dist.group.WORLD else src,
                               group=group)  # fmt: skip
    return box[0]


def shard(data: Iterable, rank: int | None = None, world: int | None = None, group: Any = None) -> list:
    """Batches ``i`` with ``i % world == rank`` (round-robin by batch; shards may differ in size).

    A one-batch data set is split by samples instead. With ``rank``/``world`` unset they
    come from ``group`` (or the default group).
    """
    from .operators._data import is_single_batch

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
            raise TypeError("shard: a single batch must hold tensors to be split by samples")
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
    from .algorithms._common import rademacher
    from .algorithms.lanczos import lanczos
    from .algorithms.slq import ritz_from_tridiagonal
    from .algorithms.spectrum import Spectrum
    from .operators._base import as_operator

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
