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
    "explain_failure",
    "note_peers",
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


# ---------------------------------------------------------------------------------------------- a peer that died
_PEERS: list[tuple[str, int]] = []  # (host, pid) per rank, from note_peers
_COLLECTIVE_FAILURES = ("connection reset", "connection closed", "broken pipe", "timed out", "timeout",
                        "connection refused", "end of file", "socket")  # fmt: skip


def note_peers(group: Any = None) -> list[tuple[str, int]]:
    """Record every rank's host and pid (one all-gather), so :func:`explain_failure` can name a dead rank.

    The CLI calls it when it joins a ``torchrun`` job; a library user may call it after
    ``init_process_group``.
    """
    import os
    import socket

    if not (dist.is_available() and dist.is_initialized()):
        return []
    g = resolve_group(group if group is not None else True)
    peers: list[Any] = [None] * rank_and_world(g)[1]
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()), group=g)
    _PEERS[:] = [tuple(p) for p in peers]
    return list(_PEERS)


def _state(host: str, pid: int) -> str | None:
    """``"died"``, ``"is stopped"`` or ``None`` (running, or on another host) for a peer process."""
    import os
    import socket

    if host != socket.gethostname():
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "died"
    except OSError:  # no /proc (macOS): ask the kernel whether it exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "died"
        except PermissionError:
            return None
        return None
    return {
        "Z": "died",
        "X": "died",
        "T": "is stopped (SIGSTOP, or held in a debugger)",
        "t": "is stopped (traced)",
    }.get(state)


def explain_failure(exc: BaseException) -> str | None:
    """A message naming the rank that died or hung, when ``exc`` is a collective that failed because of it.

    gloo reports a dead peer as ``Connection reset by peer`` and a hung one as a timeout, with
    an address but no rank; with the hosts and pids of :func:`note_peers` this says which rank
    it was (on this host: died, or stopped) and what to do. ``None`` for any other exception.

    Examples:
        >>> explain_failure(ValueError("bad input")) is None
        True
    """
    import os

    text = str(exc)
    if not isinstance(exc, RuntimeError) or not any(k in text.lower() for k in _COLLECTIVE_FAILURES):
        return None
    me = dist.get_rank() if dist.is_available() and dist.is_initialized() else None
    culprits = [f"rank {r} (pid {pid}) {state}" for r, (host, pid) in enumerate(_PEERS)
                if r != me and (state := _state(host, pid)) is not None]  # fmt: skip
    who = "; ".join(culprits) if culprits else "another rank stopped answering (it died, hung or lost its network)"
    first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
    timeout = os.environ.get("HESD_DIST_TIMEOUT", "600")
    return (f"rank {me}: a collective operation failed because {who} ({type(exc).__name__}: {first}). A job cannot "
            f"go on without every rank; rerun it (finished checkpoints are resumed from the results folder). A hung "
            f"rank is given up on after HESD_DIST_TIMEOUT={timeout} s")  # fmt: skip
