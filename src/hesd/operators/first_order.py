r"""The first-order pass: loss, gradient and kept first-order graphs over all the data.

Before the first product, :func:`first_order_pass` goes over the data once. Per batch it
evaluates the loss :math:`\ell_b` and its gradient :math:`g_b = \nabla \ell_b`, and, while the
memory budget allows, keeps the graph of :math:`g_b` so that a product :math:`H_b v` is one
backward pass through it (no forward). Batches whose graphs do not fit are kept as data and
recomputed per product; if the batches themselves do not fit, nothing is kept and every
product reads the data again. The pass returns a :class:`FirstOrderState`: the total item
count :math:`N`, the loss :math:`L = \sum_b w_b \ell_b` and gradient
:math:`\nabla L = \sum_b w_b g_b` (all-reduced over the ranks of a process group), and what
was kept.

:class:`Objective` is the loss of one batch as a function of the parameters, under the
forward context; every product method evaluates batches through it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..collectives import agree, all_reduce_sum
from ..errors import HesdValueError, NonDeterministicError, NonFiniteLossError
from .chunks import micro_batches
from .data import ModelCall
from .forward import ForwardContext
from .layout import ParameterLayout
from .loss import LossBatch, LossContract

__all__ = [
    "FirstOrderState",
    "GradientSum",
    "KeptGraph",
    "Objective",
    "default_budget",
    "first_order_pass",
    "flat_graph",
]


def default_budget(device: torch.device) -> int:
    """Bytes of first-order graphs kept by default: half the free GPU memory, a quarter of free RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        avail = 4 * 2**30
    return int(avail * 0.25)


@contextmanager
def count_saved_bytes(counter: list[int]) -> Iterator[None]:
    """Sum the bytes of the distinct tensor storages that autograd saves inside the block."""
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                counter[0] += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensors
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def nbytes(x: Any) -> int:
    """Bytes of the tensors in a (nested) batch."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, LossBatch):
        return nbytes(x.inputs) + nbytes(x.targets)
    if isinstance(x, dict):
        return sum(nbytes(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return sum(nbytes(v) for v in x)
    return 0


def flat_graph(grads: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """One batch's first-order gradient as one flat tensor that keeps its graph.

    ``None`` when the gradient does not depend on the parameters (that batch's Hessian is
    zero). One flat output lets a product pass the vector to ``torch.autograd.grad`` whole:
    split into per-parameter views in Python instead, a product of the digits MLP cost about
    6 % more (BENCHMARKS.md). Its graph adds one ``CatBackward`` node and ``P`` entries per
    kept batch.
    """
    if not any(g.requires_grad for g in grads):
        return None
    return torch.cat([g.reshape(-1) for g in grads])


class Objective:
    """The loss of each batch of ``data`` as a function of the selected parameters.

    Args:
        model: the network.
        contract: how a batch becomes a loss (:mod:`hesd.operators.loss`).
        data: a re-iterable of raw batches.
        layout: the selected parameters.
        forward: the forward context (autocast is applied here; the caller enters the state).

    Attributes:
        fd_step: the relative step of finite-difference products, or ``None`` for the default
            (:mod:`hesd.operators.finite_difference`).
        max_tokens: cut every batch into micro-batches of at most this many tokens
            (:mod:`hesd.operators.chunks`), or ``None``.
    """

    def __init__(
        self, model: nn.Module, contract: LossContract, data: Iterable[Any], layout: ParameterLayout,
        forward: ForwardContext,
    ) -> None:  # fmt: skip
        self.model, self.contract, self.data = model, contract, data
        self.layout, self.forward = layout, forward
        self.fd_step: float | None = None
        self.max_tokens: int | None = None

    def batches(self) -> Iterator[LossBatch]:
        """The non-empty batches, prepared (parsed, counted, on the parameters' device)."""
        for whole in self.data:
            for raw in micro_batches(whole, self.max_tokens):
                batch = self.contract.prepare(raw, self.layout.device, self.layout.dtype)
                if batch is not None:
                    yield batch

    def loss(self, batch: LossBatch, index: int, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The batch's loss as a 0-d tensor (``params``: a functional call with these tensors).

        Raises:
            HesdValueError: the loss is not a scalar.
            NonFiniteLossError: the loss is NaN or infinite.
        """
        autocast = None
        if self.forward.autocast_dtype is not None:
            autocast = lambda: self.forward.autocast(self.layout.device)  # noqa: E731
        call = ModelCall(self.model, params, autocast, self.layout.dtype)
        loss = self.contract.loss(call, batch, functional=params is not None)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise HesdValueError(
                f"HessianOperator: the loss must be a scalar tensor, got {shape}; use a loss with reduction='mean'"
            )
        if params is None and not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"HessianOperator: the loss is {loss.item()} on batch {index}; the checkpoint has diverged or the "
                "data holds NaN/inf. Check the checkpoint and the inputs; curvature is undefined there"
            )
        return loss.reshape(())

    def gradient(self, loss: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, ...]:
        """``∇ loss`` over the selected parameters (zeros for parameters the loss does not use)."""
        return torch.autograd.grad(
            loss, self.layout.params, create_graph=create_graph, allow_unused=True, materialize_grads=True
        )


@dataclass
class KeptGraph:
    """A batch's first-order graph kept across products: its item count and flat gradient."""

    count: int
    flat: torch.Tensor | None


@dataclass
class FirstOrderState:
    """What the first-order pass found and kept.

    Attributes:
        total: items in the data, all ranks together (:math:`N`).
        loss: the loss over all the data.
        gradient: its gradient, ``(P,)``.
        kept: batches whose first-order graphs are kept.
        stored: batches kept as data, recomputed by double backward per product.
        stream: nothing could be kept: every product reads the data again.
        graph_bytes: bytes of the kept graphs on this rank.
        versions: the parameters' version counters at the time (see :meth:`stale`).
    """

    total: float
    loss: float
    gradient: torch.Tensor
    kept: list[KeptGraph] = field(default_factory=list)
    stored: list[LossBatch] = field(default_factory=list)
    stream: bool = False
    graph_bytes: int = 0
    versions: list[int] = field(default_factory=list)

    def stale(self, layout: ParameterLayout) -> bool:
        """Whether the parameters changed in place since the pass (an optimiser step)."""
        return layout.versions() != self.versions


def _local_pass(objective: Objective, budget: int, keep_graphs: bool, unlimited: bool):
    """One pass over this rank's data: counts, losses, gradients, kept graphs and stored batches."""
    used = 0
    kept: list[KeptGraph] = []
    stored: list[LossBatch] = []
    stored_bytes = 0
    stream = False
    losses: list[tuple[int, torch.Tensor]] = []
    grad = GradientSum(objective)
    for index, batch in enumerate(objective.batches()):
        counter = [0]
        want_graph = keep_graphs and not stream and (unlimited or used < budget)
        with torch.enable_grad(), count_saved_bytes(counter):
            loss = objective.loss(batch, index)
            g = objective.gradient(loss, create_graph=want_graph)
        flat = None
        if want_graph and (unlimited or used + counter[0] <= budget):
            with torch.enable_grad():
                flat = flat_graph(g)
            kept.append(KeptGraph(batch.count, flat))
            used += counter[0]
        elif keep_graphs and not stream:
            used = budget  # no more graphs; remember the batch itself
            stored.append(batch)
            stored_bytes += nbytes(batch)
            if stored_bytes > budget:
                stream, stored = True, []
        losses.append((batch.count, loss.detach()))
        grad.add(batch.count, flat.detach() if flat is not None else objective.layout.flatten([t.detach() for t in g]))
    if stream:  # batches do not fit: keep no partial cache (a reshuffling loader would mix samples)
        kept, used = [], 0
    return losses, grad, kept, stored, stream, used


class GradientSum:
    r"""The running sum :math:`\sum_b c(n_b)\, g_b` of the batches' gradients, one ``(P,)`` buffer.

    Every loss contract weighs a batch by :math:`w_b = c(n_b) / N`
    (:meth:`hesd.operators.LossContract.weight`), so the gradient of the loss over all the data
    is this sum divided by :math:`N` once the pass has counted it: one gradient's memory
    however many batches there are (not one per batch).
    """

    def __init__(self, objective: Objective) -> None:
        self.weight = objective.contract.weight
        layout = objective.layout
        self.sum = torch.zeros(layout.dim, dtype=torch.promote_types(layout.dtype, torch.float32), device=layout.device)

    def add(self, count: int, g: torch.Tensor) -> None:
        """Add one batch's flat gradient ``g`` of ``count`` items."""
        self.sum.add_(g, alpha=self.weight(count, 1.0))


def _total_items(objective: Objective, losses: list[tuple[int, torch.Tensor]], group: Any) -> float:
    """The items in all the data (all ranks) from the batches' item counts."""
    count = torch.tensor([float(sum(n for n, _ in losses))], dtype=torch.float64, device=objective.layout.device)
    return float(all_reduce_sum(count, group).item())


def _total_loss(objective: Objective, losses: list[tuple[int, torch.Tensor]], total: float, group: Any) -> float:
    """The loss over all the data (all ranks) from the batches' losses and item counts."""
    weight = objective.contract.weight
    loss = sum(weight(n, total) * float(v) for n, v in losses)
    return float(all_reduce_sum(torch.tensor([loss], dtype=torch.float64, device=objective.layout.device), group))


def _reduce(objective: Objective, losses, grad: GradientSum, total: float, group: Any) -> tuple[float, torch.Tensor]:
    return _total_loss(objective, losses, total, group), all_reduce_sum(grad.sum.div_(total), group)


def first_order_pass(
    objective: Objective,
    *,
    budget: int,
    keep_graphs: bool,
    unlimited: bool,
    group: Any = None,
    check_deterministic: bool = True,
) -> FirstOrderState:
    """Count items, evaluate loss and gradient, keep first-order graphs, check determinism.

    Call inside the forward context's state and precision. A failure on any rank of
    ``group`` stops every rank with a :class:`hesd.collectives.DistributedError` naming it.

    Args:
        objective: the batches' losses.
        budget: bytes of first-order graphs this rank may keep.
        keep_graphs: keep graphs at all (``hvp_method`` ``"auto"`` or ``"graph"``).
        unlimited: keep every graph whatever the budget (``hvp_method="graph"``).
        group: a ``torch.distributed`` process group, or ``None``.
        check_deterministic: evaluate the loss a second time and compare (:func:`_check_determinism`).

    Raises:
        HesdValueError: the data holds no item.
        NonFiniteLossError: a batch's loss is NaN or infinite.
        NonDeterministicError: two passes over the same data disagree.
    """
    error: BaseException | None = None
    try:
        losses, grads, kept, stored, stream, used = _local_pass(objective, budget, keep_graphs, unlimited)
        if not losses and group is None:
            raise HesdValueError("HessianOperator: data yielded no samples; pass a non-empty DataLoader or batch")
    except Exception as exc:
        error, losses, grads, kept, stored, stream, used = exc, [], GradientSum(objective), [], [], False, 0
    if group is not None:
        agree(group, error, "HessianOperator.prepare")
    elif error is not None:
        raise error
    layout = objective.layout
    total = _total_items(objective, losses, group)
    if total == 0:
        raise HesdValueError("HessianOperator: no rank holds any sample; pass non-empty data shards")
    loss, gradient = _reduce(objective, losses, grads, total, group)
    state = FirstOrderState(total, loss, gradient, kept, stored, stream, used, layout.versions())
    if check_deterministic:
        _check_determinism(objective, state, group)
    return state


def _check_determinism(objective: Objective, state: FirstOrderState, group: Any) -> None:
    r"""Evaluate the loss over all the data again (forward passes, no backward) and compare it with the first pass's.

    What makes Hessian-vector products random — dropout, a random augmentation, a loader that
    drops different samples each time — changes the loss, so forward passes find it for some 40 %
    of a gradient's cost (GPT-2 small: 0.9 s against 2.1–2.3 s; hesd compared gradients before,
    BENCHMARKS.md §9). The loss over all the data, not each batch's: a loader that only reshuffles
    the samples between batches leaves the Hessian unchanged. The forwards record their graphs as
    the first pass did, which are then dropped: without, bfloat16 autocast took other kernels and
    the loss moved by 1.3e-4.
    """
    error: BaseException | None = None
    losses: list[tuple[int, torch.Tensor]] = []
    try:
        with torch.enable_grad():  # as the first pass ran it: the same kernels
            for index, batch in enumerate(objective.batches()):
                losses.append((batch.count, objective.loss(batch, index).detach()))
    except Exception as exc:  # raised on every rank by agree, not on this one alone
        error = exc
    agree(group, error, "HessianOperator's determinism check")
    layout = objective.layout
    loss = _total_loss(objective, losses, state.total, group)
    same = _total_items(objective, losses, group) == state.total
    worst = abs(loss - state.loss) / (abs(state.loss) + 1e-30) if same else math.inf
    tol = 1e-9 if layout.dtype == torch.float64 else 1e-4
    if worst > tol or not math.isfinite(worst):
        forward = objective.forward
        hint = ""
        if forward.model_mode == "train" and forward.config_dropout:
            hint = (f"The model's transformers config sets dropout ({', '.join(forward.config_dropout)}), which "
                    "applies in training mode: use model_mode='eval' (model.eval()) or load the model with those "
                    "fields at 0.0. ")  # fmt: skip
        raise NonDeterministicError(
            "HessianOperator: two passes over the same data gave different losses "
            f"(relative difference {worst:.2e}). Hessian-vector products would be random. {hint}"
            "Common causes: dropout or BatchNorm in train mode (use model_mode='eval'), a DataLoader "
            "with random augmentation or drop_last with shuffling (use a fixed, un-augmented loader). "
            "Pass check_deterministic=False to skip this check."
        )
