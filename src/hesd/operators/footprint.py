r"""What one batch costs in memory, measured: the inputs of the memory planner.

:func:`measure_footprint` runs, on one and on two rows of an operator's first batch, each
pass a plan may use and records the peak of the bytes allocated during it (:func:`allocation_peak`: PyTorch's
profiler on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU — allocator bytes, not the
process's resident size):

* ``graph`` — the bytes a kept first-order graph holds (saved tensors, as
  :func:`~hesd.operators.first_order.first_order_pass` counts them);
* ``kept_product`` — the transient peak of one product through that kept graph;
* ``recompute_product`` — of one product that rebuilds the graph (``double_backward``): the
  graph plus the second backward's buffers;
* ``fd_product`` — of one finite-difference column: a forward and a plain backward, twice.

Activation memory grows with the tokens a pass holds (rows × sequence length,
:mod:`~hesd.operators.chunks`) while parameter-sized buffers do not, so each part is fitted as
``a + b · tokens`` from the two probes and scaled to every (micro-)batch (``tokens`` lists
them). The probes hold one and two rows whatever the batch size, so the planner itself stays
small beside a large batch (a 124 M-parameter GPT-2's full 4 × 128-token batch, probed whole,
took the process to 9.8 GiB). They cost about four products of two rows; the parameters are
left exactly as they were.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..allocator import release_free_memory
from ..errors import HesdError, HesdValueError
from .chunks import micro_batches, num_rows, sequence_length
from .finite_difference import finite_difference_pass
from .first_order import FirstOrderState, Objective, count_saved_bytes, flat_graph
from .products import double_backward_product, kept_graph_product

__all__ = ["Footprint", "allocation_peak", "measure_footprint"]

T = TypeVar("T")


def allocation_peak(fn: Callable[[], T], device: torch.device) -> tuple[T, int]:
    """``fn()`` and the peak of the bytes allocated during it above what was allocated before.

    On a GPU, ``torch.cuda.max_memory_allocated``; on the CPU, the running sum of the
    allocations and frees PyTorch's profiler records (``profile_memory=True``).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_stderr():  # the profiler's C++ side prints a line on start and on stop
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_native_stderr():
            prof.stop()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return out, peak


@contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null inside the block (native code's prints; Python's too)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass
class Footprint:
    """One batch's memory, measured (module docs); bytes, for the first (micro-)batch.

    Attributes:
        dim: selected parameters :math:`P`.
        item: bytes per parameter entry.
        vector_item: bytes per entry of the operator's vectors (float64 for half models).
        graph: a kept first-order graph (``None``: PyTorch cannot double-differentiate the model).
        kept_product: transient peak of a product through a kept graph (or ``None``).
        recompute_product: transient peak of a product that rebuilds the graph (or ``None``).
        fd_product: transient peak of a finite-difference column (``None`` for half precision).
        tokens: tokens of every (micro-)batch, in order; ``tokens[0]`` is the measured one.
        rows: rows of every (micro-)batch.
        length: sequence length of the measured batch (1 without token ids).
        shards: ranks the Lanczos vectors are split across (:mod:`hesd.operators.sharded`); set
            by the planner, 1 for whole vectors.
        fit: ``part -> (a, b)``, the bytes of ``part`` as ``a + b · tokens``.
    """

    dim: int
    item: int
    vector_item: int
    graph: int | None
    kept_product: int | None
    recompute_product: int | None
    fd_product: int | None
    tokens: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    length: int = 1
    shards: int = 1
    fit: dict[str, tuple[float, float]] = field(default_factory=dict)

    def scaled(self, part: str, tokens: float) -> float:
        """``part`` for a pass holding ``tokens`` tokens (``a + b · tokens``); ``inf`` when unavailable."""
        if getattr(self, part) is None:
            return math.inf
        a, b = self.fit.get(part, (0.0, getattr(self, part) / max(self.tokens[0], 1)))
        return a + b * tokens


def _sizes(data: Any, max_tokens: int | None) -> tuple[list[int], list[int]]:
    tokens, rows = [], []
    for whole in data:
        for raw in micro_batches(whole, max_tokens):
            n = num_rows(raw) or 1
            rows.append(n)
            tokens.append(n * sequence_length(raw))
    return tokens, rows


def _probe(op: Any, raw: Any) -> tuple[int | None, int | None, int | None, int | None]:
    """``(graph, kept, recompute, fd)`` bytes of the passes over one raw (micro-)batch."""
    objective = op.objective
    layout = objective.layout
    device = layout.device
    batch = objective.contract.prepare(raw, device, layout.dtype)
    if batch is None:
        return None, None, None, None
    gen = torch.Generator(device=device).manual_seed(0)  # the user's random state is left alone
    v = torch.randn(layout.dim, 1, dtype=layout.dtype, device=device, generator=gen)
    saved = [0]

    def first_order() -> torch.Tensor | None:
        with torch.enable_grad(), count_saved_bytes(saved):
            return flat_graph(objective.gradient(objective.loss(batch, 0), create_graph=True))

    graph: int | None = None
    kept = recompute = fd = None
    try:
        with op.forward.state(), op.forward.precision(device):
            flat, _ = allocation_peak(first_order, device)
            graph = saved[0]
            with torch.enable_grad():
                _, kept = allocation_peak(functools.partial(kept_graph_product, flat, layout, v, 1.0, 1, None), device)
            flat = None  # the probe's graph is freed before the next one
            _, recompute = allocation_peak(
                lambda: double_backward_product(objective, batch, 0, v, 1.0, 1, None), device
            )
    except RuntimeError as exc:  # no double backward for this model: finite differences only
        if isinstance(exc, HesdError):
            raise
    if layout.dtype not in (torch.bfloat16, torch.float16):
        state = FirstOrderState(total=float(batch.count), loss=0.0, gradient=torch.zeros(0))
        one = Objective(objective.model, objective.contract, [raw], layout, objective.forward)
        one.fd_step = objective.fd_step
        _, fd = allocation_peak(lambda: finite_difference_pass(state, one, v, 1), device)  # restores the parameters
    return graph, kept, recompute, fd


def measure_footprint(op: Any) -> Footprint:
    """Measure a :class:`hesd.HessianOperator` on one and two rows of its first batch (module docs).

    Each part is fitted as ``a + b · tokens`` (parameter-sized buffers do not grow with the
    batch, activations do) and given at the first (micro-)batch's size; a batch of one row is
    measured as it is. The probe itself stays small, whatever the batch.

    Raises:
        HesdValueError: the data holds no item.
    """
    objective = op.objective
    layout = objective.layout
    tokens, rows = _sizes(objective.data, objective.max_tokens)
    if not tokens:
        raise HesdValueError("plan_memory: the data holds no item")
    first_raw = next(iter(micro_batches(next(iter(objective.data)), objective.max_tokens)))
    length = sequence_length(first_raw)
    pieces = iter(micro_batches(first_raw, length))  # one row each
    one = next(pieces)
    two = next(iter(micro_batches(first_raw, 2 * length)), None) if rows[0] > 1 else None
    small = _probe(op, one)
    pair = _probe(op, two) if two is not None else None
    release_free_memory()  # the probe's buffers are freed: do not keep them resident beside the analysis
    fit: dict[str, tuple[float, float]] = {}
    values: list[int | None] = []
    for k, part in enumerate(("graph", "kept_product", "recompute_product", "fd_product")):
        m1 = small[k]
        m2 = pair[k] if pair is not None else None
        if m1 is None:
            values.append(None)
            continue
        if m2 is None:  # one row: proportional
            fit[part] = (0.0, m1 / length)
        else:
            b = max(0.0, (m2 - m1) / length)
            fit[part] = (max(0.0, m1 - b * length), b)
        a, b = fit[part]
        values.append(int(a + b * tokens[0]))
    vector_item = 8 if layout.dtype in (torch.bfloat16, torch.float16) else layout.params[0].element_size()
    return Footprint(dim=layout.dim, item=layout.params[0].element_size(), vector_item=vector_item, graph=values[0],
                     kept_product=values[1], recompute_product=values[2], fd_product=values[3], tokens=tokens,
                     rows=rows, length=length, fit=fit)  # fmt: skip
