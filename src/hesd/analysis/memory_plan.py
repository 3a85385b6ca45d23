r"""The memory planner: a plan for one model's analysis that fits a budget, chosen before any product.

:func:`plan_memory` measures the first batch (:func:`hesd.operators.footprint.measure_footprint`:
the kept first-order graph and the transient peak of each kind of product) and adds up what
an analysis of ``num_steps`` Lanczos steps holds at its peak, beyond the model and the data
already in memory:

* **gradient** — the loss gradient (one vector, float32 or wider), and one batch's during the
  first pass;
* **Lanczos vectors** — the recurrence's working vectors (six of :math:`P` entries, four beside
  a basis stored in the operator's dtype);
* **basis** — the stored Lanczos vectors: ``num_steps`` × :math:`P` in the operator's dtype
  (full re-orthogonalisation), or less (:func:`hesd.algorithms.slq.plan_basis`); divided by
  the world size when data-parallel ranks split the vectors (``shards``);
* **kept graphs** — first-order graphs kept across products (each batch's scaled from the
  first by its tokens);
* **product** — the transient peak of one product on the largest (micro-)batch: through a kept
  graph, rebuilding it, or by finite differences (plus a copy of the parameters and two
  gradients).

Then it takes the first plan that fits in nine tenths of the budget (the tenth held back for
what one batch's measurement misses: allocator rounding, a larger batch's odd shapes), in order
of what it costs in accuracy:

1. exact products and a full basis, keeping as many first-order graphs as the rest allows;
   if even one product's transient does not fit, batches are cut into micro-batches of fewer
   tokens (:mod:`hesd.operators.chunks`; costs time, not accuracy);
2. finite-difference products (a smaller transient; about :math:`10^{-4}` relative error in
   float32, :mod:`hesd.operators.finite_difference`) with a full basis;
3. exact products with a reduced basis (bfloat16, or a window of recent vectors:
   :func:`~hesd.algorithms.slq.plan_basis` states what each costs);

and otherwise stops with a :class:`hesd.errors.MemoryBudgetError` that lists the model size,
each part's bytes in the leanest plan and the options. :attr:`MemoryPlan.choices` says in words
what was chosen and why. The estimate is checked against the measured peak resident memory in
``benchmarks/scale.py`` (BENCHMARKS.md §9).

Examples:
    >>> import torch, hesd
    >>> from hesd.analysis.memory_plan import plan_memory
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    >>> data = [(torch.randn(32, 8), torch.randint(0, 3, (32,))) for _ in range(2)]
    >>> plan = plan_memory(model, torch.nn.functional.cross_entropy, data, num_steps=30, max_memory=2**30)
    >>> plan.hvp_method, plan.basis["reorth"], plan.total <= plan.budget
    ('auto', 'full', True)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..algorithms.slq import plan_basis
from ..allocator import host_available
from ..errors import MemoryBudgetError
from ..operators import HessianOperator
from ..operators.footprint import Footprint, measure_footprint

__all__ = ["LANCZOS_VECTORS", "MARGIN", "MemoryPlan", "available_memory", "plan_for_settings", "plan_memory"]

logger = logging.getLogger("hesd")

#: the share of the budget held back (module docs)
MARGIN = 0.1

#: working vectors of :math:`P` entries the Lanczos recurrence holds (the current and previous
#: vector, the product, the probe, the projection's temporaries); two fewer beside a basis that
#: stores its vectors in the operator's dtype, whose views are the current and previous vector
#: (:func:`hesd.algorithms.lanczos_lockstep`; ``tests/algorithms/test_lanczos_memory.py``)
LANCZOS_VECTORS = 6


def _held(basis: dict | None) -> int:
    """Working vectors beside ``basis`` (``None``: not chosen yet, so the larger count)."""
    exact = basis is not None and basis["basis_bytes"] > 0 and basis["basis_dtype"] is None
    return LANCZOS_VECTORS - 2 if exact else LANCZOS_VECTORS


def available_memory(device: torch.device) -> int:
    """Bytes free for the analysis: free GPU memory, or the host's available memory (``MemAvailable``)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = host_available()
    return available if available is not None else int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _gib(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@dataclass
class MemoryPlan:
    """A plan that fits (module docs).

    Attributes:
        budget: the bytes allowed.
        parts: bytes of each part at the peak (module docs).
        hvp_method: the product method for :class:`hesd.HessianOperator`.
        graph_budget: bytes of first-order graphs the operator may keep (``memory_budget``).
        max_tokens: micro-batch size in tokens, or ``None``.
        basis: :func:`~hesd.algorithms.slq.plan_basis`'s choice (``reorth``, ``window``,
            ``basis_dtype``, ``basis_bytes``).
        choices: what was chosen, and what it costs, in words.
        footprint: the measurement the plan rests on.
        autocast_dtype: the forward passes' autocast dtype the footprint was measured under
            (passed on to the operator: a plan measured under bfloat16 autocast keeps graphs of
            about half the float32 size, and does not fit a float32 run).
        host_reserve: on the CPU, one product's transient peak (``parts["product"]``): passed on
            to the operator, which hands freed blocks back to the OS before a product that would
            find less available (:func:`hesd.allocator.release_when_low`). ``None`` on a GPU.
    """

    budget: int
    parts: dict[str, float]
    hvp_method: str
    graph_budget: int
    max_tokens: int | None
    basis: dict
    choices: list[str] = field(default_factory=list)
    footprint: Footprint | None = None
    autocast_dtype: torch.dtype | None = None
    host_reserve: int | None = None

    @property
    def total(self) -> float:
        """The estimated peak: the sum of :attr:`parts`."""
        return float(sum(self.parts.values()))

    def operator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`hesd.HessianOperator`."""
        kw = {"hvp_method": self.hvp_method, "memory_budget": self.graph_budget, "max_tokens": self.max_tokens}
        kw |= {"host_reserve": self.host_reserve} if self.host_reserve is not None else {}
        return kw | ({"autocast_dtype": self.autocast_dtype} if self.autocast_dtype is not None else {})

    @property
    def eigen_basis(self) -> int:
        """``max_basis`` for :func:`hesd.eigenvalues` after the SLQ, 6 to 40 vectors.

        Sized to the SLQ basis's bytes (the two bases are never alive together): restarted
        Lanczos holds ``max_basis + 1`` vectors (a restart rotates them in place, a block of
        columns at a time). Below 6 it converges too slowly to be worth the memory saved, so 6
        is the floor even where it exceeds the SLQ basis.
        """
        fp = self.footprint
        if fp is None:
            return 40
        fit = self.basis["basis_bytes"] // max(fp.dim * fp.vector_item, 1)
        return int(max(6, min(40, fit - 1)))  # the basis and the next vector

    def extremes_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`hesd.eigenvalues` of the extreme value at each end, without eigenvectors.

        Where the SLQ's basis is a window (the full basis does not fit), a window too
        (``reorth="window"``: three vectors, no restarts, :mod:`hesd.algorithms.extremes`);
        otherwise the restarted method with :attr:`eigen_basis`.
        """
        if self.basis["reorth"] == "window":
            return {"reorth": "window"}
        return {"max_basis": self.eigen_basis}

    def slq_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`hesd.slq` (one probe at a time: the basis is for one)."""
        return {k: self.basis[k] for k in ("reorth", "window", "basis_dtype")} | {"lockstep": 1}

    def describe(self) -> str:
        """The plan as a few lines: each part's bytes, the total against the budget, the choices."""
        lines = [f"memory plan: {_gib(self.total)} estimated of {_gib(self.budget)}"]
        lines += [f"  {name:<16} {_gib(b):>12}" for name, b in self.parts.items()]
        return "\n".join(lines + [f"  - {c}" for c in self.choices])


def _parts(fp: Footprint, basis: dict | None, kept: float, product: float, fd: bool) -> dict[str, float]:
    vec = fp.dim * fp.vector_item
    grad = fp.dim * max(fp.item, 4)
    held = _held(basis)
    vectors = (
        held * vec if fp.shards == 1 else (held * -(-fp.dim // fp.shards) * fp.vector_item + 2 * vec)
    )  # blocks, and v, Hv whole in a product
    basis_bytes = basis["basis_bytes"] if basis is not None else 0
    parts = {"gradient": 2.0 * grad, "Lanczos vectors": vectors, "basis": basis_bytes,
             "kept graphs": kept, "product": product}  # fmt: skip
    if fd:
        parts["product"] = product + fp.dim * fp.item + 2 * grad  # θ0 and the two gradients
    return parts


def _fit_tokens(fp: Footprint, part: str, room: float) -> int | None:
    """The largest micro-batch (whole rows, in tokens) whose ``part`` transient fits ``room``; else ``None``."""
    fixed = fp.scaled(part, 0)  # parameter-sized buffers: the same for any micro-batch
    per_token = fp.scaled(part, 1) - fixed
    if not math.isfinite(fixed) or room < fixed:
        return None
    if per_token <= 0:
        return max(fp.tokens)
    rows = int((room - fixed) / (per_token * fp.length))
    return rows * fp.length if rows >= 1 else None


def _exact(fp: Footprint, budget: int, basis: dict, max_tokens: int | None) -> tuple[MemoryPlan | None, str]:
    """Exact products with this basis: all graphs kept, some kept, or micro-batches; ``None`` if none fits."""
    biggest = max(fp.tokens)
    fixed = sum(_parts(fp, basis, 0, 0, False).values())
    room = budget - fixed
    all_graphs = sum(fp.scaled("graph", t) for t in fp.tokens)
    if all_graphs + fp.scaled("kept_product", biggest) <= room:
        parts = _parts(fp, basis, all_graphs, fp.scaled("kept_product", biggest), False)
        plan = MemoryPlan(budget, parts, "auto", int(all_graphs * 1.05) + 1, max_tokens, basis)
        return plan, "every first-order graph kept (one backward pass per product)"
    recompute = fp.scaled("recompute_product", biggest)
    if recompute <= room:
        graphs = room - recompute
        parts = _parts(fp, basis, graphs, recompute, False)
        return MemoryPlan(budget, parts, "auto", int(graphs), max_tokens, basis), (
            f"first-order graphs kept up to {_gib(graphs)}, the other batches recomputed per product"
        )
    tokens = _fit_tokens(fp, "recompute_product", room)
    if tokens is None:
        return None, ""
    if max_tokens is not None:
        tokens = min(tokens, max_tokens)
    parts = _parts(fp, basis, 0, fp.scaled("recompute_product", tokens), False)
    plan = MemoryPlan(budget, parts, "double_backward", 0, tokens, basis)
    return plan, (f"batches of {biggest} tokens cut into micro-batches of {tokens} (max_tokens={tokens}): the same "
                  "Hessian, each product's activations bounded; no graph kept")  # fmt: skip


def _fd(fp: Footprint, budget: int, basis: dict, max_tokens: int | None) -> tuple[MemoryPlan | None, str]:
    biggest = max(fp.tokens)
    room = budget - sum(_parts(fp, basis, 0, 0, True).values())
    tokens = biggest if fp.scaled("fd_product", biggest) <= room else _fit_tokens(fp, "fd_product", room)
    if tokens is None:
        return None, ""
    cut = tokens < biggest
    tokens_kw = tokens if cut else max_tokens
    parts = _parts(fp, basis, 0, fp.scaled("fd_product", tokens), True)
    what = "finite-difference products (gradients only; about 1e-4 relative error in float32, 1e-10 in float64)"
    return MemoryPlan(budget, parts, "finite_difference", 0, tokens_kw, basis), what + (
        f", in micro-batches of {tokens} tokens" if cut else ""
    )


def plan_memory(
    model: nn.Module,
    loss_fn: Callable | None,
    data: Any,
    *,
    num_steps: int,
    max_memory: int | None = None,
    hvp_method: str = "auto",
    params: Any = None,
    model_mode: str = "eval",
    max_tokens: int | None = None,
    shards: int = 1,
    autocast_dtype: torch.dtype | None = None,
) -> MemoryPlan:
    """A plan for ``num_steps``-step SLQ of ``model`` that fits ``max_memory`` bytes (module docs).

    Args:
        model: as for :class:`hesd.HessianOperator`.
        loss_fn: as for :class:`hesd.HessianOperator`.
        data: as for :class:`hesd.HessianOperator` (read once more for the sizes).
        num_steps: Lanczos steps per probe (probes run one at a time).
        max_memory: bytes the analysis may allocate beyond the model and the data already in
            memory; default :func:`available_memory`.
        hvp_method: ``"auto"`` lets the planner choose; an exact method or
            ``"finite_difference"`` is kept as given.
        params: as for :class:`hesd.HessianOperator`.
        model_mode: as for :class:`hesd.HessianOperator`.
        max_tokens: a micro-batch size the user already chose (the planner may cut finer).
        shards: ranks the Lanczos vectors are split across (data parallel:
            :class:`hesd.operators.sharded.ShardedOperator`); the basis per rank divides by it.
        autocast_dtype: as for :class:`hesd.HessianOperator`: the first batch is measured under
            that autocast (bfloat16 graphs are about half the size), and the plan's
            :meth:`~MemoryPlan.operator_kwargs` pass it on.

    Raises:
        MemoryBudgetError: no plan fits; the message lists each part and the options.
    """
    op = HessianOperator(model, loss_fn, data, params=params, model_mode=model_mode, max_tokens=max_tokens,
                         check_deterministic=False, hvp_method=hvp_method, autocast_dtype=autocast_dtype)  # fmt: skip
    budget = int(max_memory) if max_memory is not None else available_memory(op.device)
    fp = measure_footprint(op)
    room = int(budget * (1 - MARGIN))
    dtype = op.layout.dtype if op.dtype == op.layout.dtype else op.dtype
    fp.shards = shards
    rows = -(-fp.dim // shards)  # rows of each stored Lanczos vector on this rank
    full = plan_basis(rows, num_steps, dtype, 2**62)
    exact_ok = hvp_method != "finite_difference" and fp.recompute_product is not None
    fd_ok = hvp_method in ("auto", "finite_difference") and fp.fd_product is not None
    tries: list[tuple[str, Any, dict]] = []
    if exact_ok:
        tries.append(("exact", _exact, full))
    if fd_ok:
        tries.append(("fd", _fd, full))
    leanest_basis = full
    if exact_ok or fd_ok:
        method = _exact if exact_ok else _fd
        minimal = sum(_parts(fp, None, 0, 0, method is _fd).values()) + fp.scaled(
            "recompute_product" if exact_ok else "fd_product", fp.length
        )
        reduced = plan_basis(rows, num_steps, dtype, max(0, int(room - minimal)))
        leanest_basis = reduced
        if reduced["reorth"] != "full" or reduced["basis_dtype"] is not None:
            tries.append(("reduced", method, reduced))
    for kind, make, basis in tries:
        if basis["reorth"] == "window" and basis["window"] < 2:
            continue
        plan, why = make(fp, room, basis, max_tokens)
        if plan is None:
            continue
        if hvp_method in ("graph", "double_backward", "func") and plan.hvp_method in ("auto", "double_backward"):
            plan.hvp_method = hvp_method  # kept as the user gave it
        plan.footprint, plan.budget, plan.autocast_dtype = fp, budget, autocast_dtype
        if op.device.type == "cpu":
            plan.host_reserve = int(plan.parts["product"])
        if autocast_dtype is not None:
            plan.choices.append(f"forward passes under {str(autocast_dtype).removeprefix('torch.')} autocast, "
                                "as the first batch was measured")  # fmt: skip
        plan.choices.append(why)
        if kind == "reduced":
            what = ("the Lanczos basis in bfloat16 (orthogonality to about 1e-2: Ritz values can drift by about "
                    "1e-2 of the spectral range)" if basis["reorth"] == "full" else
                    f"a window of the {basis['window']} latest Lanczos vectors (extreme values and Ct stay accurate; "
                    "converged ones reappear as spurious copies that split their weights, which moves KH05: by 9 % "
                    "on a small GPT-2 at 80 steps, BENCHMARKS.md §9)")  # fmt: skip
            plan.choices.append(f"{what}: the full basis ({_gib(full['basis_bytes'])}) does not fit")
        elif kind == "fd":
            plan.choices.append(f"exact products do not fit beside the full basis ({_gib(full['basis_bytes'])})")
        return plan
    raise _no_plan(fp, budget, num_steps, leanest_basis, full, exact_ok)


def _no_plan(fp: Footprint, budget: int, steps: int, lean: dict, full: dict, exact_ok: bool) -> MemoryBudgetError:
    part = "recompute_product" if exact_ok else "fd_product"
    parts = _parts(fp, lean, 0, fp.scaled(part, fp.length), not exact_ok)
    table = "; ".join(f"{name} {_gib(b)}" for name, b in parts.items())
    return MemoryBudgetError(
        f"plan_memory: no plan fits {_gib(budget)}. The model has {fp.dim:,} analysed parameters "
        f"({_gib(fp.dim * fp.item)}); even the leanest plan (one sequence per product, "
        f"{'exact' if exact_ok else 'finite-difference'} products, basis {lean['reorth']}"
        f"{' of ' + str(lean['window']) + ' vectors' if lean['reorth'] == 'window' else ''}) needs "
        f"{_gib(sum(parts.values()))}: {table}; a full {steps}-step basis alone is {_gib(full['basis_bytes'])}. "
        "Options: raise max_memory (--max-memory), analyse fewer parameters (params=[...], --params), "
        "fewer Lanczos steps (num_steps, --steps), or shorter sequences"
    )


def plan_for_settings(model: nn.Module, loss_fn: Any, data: Any, settings: Any, names: list[str] | None = None,
                      shards: int = 1) -> MemoryPlan:  # fmt: skip
    """:func:`plan_memory` for :class:`hesd.AnalysisSettings`, logged once per process.

    A plan that costs accuracy (finite differences, a reduced basis) is a warning, others are
    info; a series plans every checkpoint alike, so the same plan is said once.
    """
    s = settings
    plan = plan_memory(model, loss_fn, data, num_steps=s.num_steps, max_memory=s.max_memory, hvp_method=s.hvp_method,
                       params=names if names is not None else s.params, model_mode=s.model_mode,
                       shards=shards)  # fmt: skip
    deviates = plan.hvp_method == "finite_difference" or plan.basis["reorth"] != "full" or (
        plan.basis["basis_dtype"] is not None)  # fmt: skip
    text = plan.describe()
    if text not in _SAID:
        _SAID.add(text)
        (logger.warning if deviates else logger.info)("hesd: %s", text)
    return plan


_SAID: set[str] = set()
