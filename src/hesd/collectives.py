"""The ``torch.distributed`` collectives every layer of hesd uses, below the operators.

hesd never moves data itself: every collective here is one ``torch.distributed`` call (gloo
on the CPU, NCCL on a GPU). Without a process group each function is the identity (or
re-raises locally), so code written once runs in one process or many.

* :func:`resolve_group`, :func:`rank_and_world` — which group, which rank.
* :func:`all_reduce_sum` — the one tensor collective: the sum of a tensor over the ranks.
* :func:`agree`, :func:`consensus` — every rank reports success or its error, so a failure on
  one rank stops all of them with a message naming it instead of a hang.
* :func:`broadcast` — rank 0's object on every rank.

:mod:`hesd.distributed` builds the user-facing parallel modes on these.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .errors import HesdError

__all__ = [
    "DistributedError",
    "agree",
    "all_reduce_sum",
    "broadcast",
    "consensus",
    "rank_and_world",
    "resolve_group",
]


class DistributedError(HesdError, RuntimeError):
    """A rank failed, or ``torch.distributed`` is not set up; raised on every rank so the job stops together."""


def resolve_group(process_group: Any) -> Any:
    """``True`` → the default group; ``None``/``False`` → no group; a group is returned as is.

    Raises:
        DistributedError: ``True`` was passed but ``torch.distributed`` is not initialised.
    """
    if process_group is None or process_group is False:
        return None
    if process_group is True:
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError(
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


def all_reduce_sum(t: torch.Tensor, group: Any) -> torch.Tensor:
    """The sum of ``t`` over the ranks of ``group`` (``t`` itself without a group).

    gloo sums storage in memory order, so every rank must lay ``t`` out alike: a rank holding a
    ``(P, k)`` result as the transpose of a ``(k, P)`` tensor beside one holding it row by row
    (ranks may choose different block widths) once summed unrelated entries without an error
    (``tests/test_distributed.py`` pins mixed widths). A matrix is therefore summed as the
    contiguous ``(k, P)`` of its transpose: the layout products give their results
    (:meth:`~hesd.operators.layout.ParameterLayout.result`), which then needs no copy.
    """
    if group is None:
        return t
    if t.device.type == "cpu" and not _reduces_on_cpu(group):  # NCCL alone: small CPU sums go through the GPU
        return all_reduce_sum(t.to(torch.device("cuda", torch.cuda.current_device())), group).to(t.device)
    if t.ndim == 2:
        rows = t.T.contiguous()
        dist.all_reduce(rows, group=group)
        return rows.T
    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t


def _reduces_on_cpu(group: Any) -> bool:
    """Whether ``group``'s backend takes CPU tensors (gloo, MPI, or a ``"cpu:gloo,cuda:nccl"`` pair); NCCL does not."""
    backend = str(dist.get_backend(group)).lower()
    return "gloo" in backend or "mpi" in backend or "cpu:" in backend


def _statuses(group: Any, error: BaseException | None) -> list[tuple[int, str]]:
    _, world = rank_and_world(group)
    mine = None if error is None else f"{type(error).__name__}: {error}"
    statuses: list[Any] = [None] * world
    dist.all_gather_object(statuses, mine, group=group)
    return [(r, m) for r, m in enumerate(statuses) if m is not None]


def agree(group: Any, error: BaseException | None, what: str) -> None:
    """Collective: every rank reports whether ``what`` succeeded; if any failed, all raise.

    Args:
        group: the process group (``None``: re-raise ``error`` locally).
        error: this rank's exception, or ``None``.
        what: what was being done, for the message.

    Raises:
        DistributedError: on every rank, naming each failed rank and its error.
    """
    if group is None:
        if error is not None:
            raise error
        return
    failed = _statuses(group, error)
    if failed:
        _, world = rank_and_world(group)
        detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
        err = DistributedError(f"{what} failed on {len(failed)} of {world} ranks ({detail}); every rank stops")
        if error is not None and isinstance(error, HesdError):
            err.__cause__ = error
        raise err


def consensus(group: Any, error: BaseException | None) -> str | None:
    """Collective: ``None`` if every rank succeeded, else one message naming the failed ranks."""
    if group is None:
        return None if error is None else f"{type(error).__name__}: {error}"
    failed = _statuses(group, error)
    if not failed:
        return None
    _, world = rank_and_world(group)
    if len(failed) == world and len({m for _, m in failed}) == 1:
        return failed[0][1]
    return "; ".join(f"rank {r}: {m}" for r, m in failed)


def broadcast(obj: Any, group: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (identity without a group)."""
    if group is None:
        return obj
    box = [obj]
    root = dist.get_global_rank(group, src) if group is not dist.group.WORLD else src
    dist.broadcast_object_list(box, src=root, group=group)
    return box[0]
