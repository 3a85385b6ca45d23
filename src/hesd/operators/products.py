r"""Hessian-vector product methods, each a small function over one batch, and the passes over all batches.

For a block of columns :math:`V` (``(P, k)``) and a batch :math:`b` of weight :math:`w_b`
(:mod:`hesd.operators.loss`), every method adds :math:`w_b H_b V` to ``out``:

* :func:`kept_graph_product` — one backward pass through the batch's kept first-order graph
  :math:`g_b = \nabla \ell_b` (double backward without a forward): :math:`H_b v =
  \nabla (g_b^\top v)`;
* :func:`double_backward_product` — the same after recomputing the forward pass and
  :math:`g_b` (no memory kept between products);
* :func:`forward_over_reverse_product` — :func:`torch.func.jvp` of :func:`torch.func.grad`;
* :func:`hesd.operators.finite_difference.finite_difference_product` — central differences
  of the gradient (no second derivative; about :math:`u^{2/3}` relative error).

Blocks of more than one column go through one batched pass (``is_grads_batched``, or
``vmap`` over the tangents), ``width`` columns at a time. :func:`graph_pass` and
:func:`func_pass` sum a method over all the data; :data:`PASSES` names them for the operator,
so a new product method is one function here and one entry there.

``benchmarks/hvp.py`` times each method against a gradient (BENCHMARKS.md §1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from .finite_difference import finite_difference_pass
from .first_order import FirstOrderState, Objective, flat_graph
from .layout import ParameterLayout
from .loss import LossBatch

__all__ = [
    "PASSES",
    "column_blocks",
    "double_backward_product",
    "forward_over_reverse_product",
    "func_pass",
    "graph_pass",
    "kept_graph_product",
    "write",
]


def column_blocks(V: torch.Tensor, width: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Column slices of at most ``width`` columns, and ``V[:, cols]`` (a view).

    The batch's weight is applied to the results (:func:`write`), so no scaled copy of
    ``V`` is held.
    """
    for start in range(0, V.shape[1], width):
        cols = slice(start, min(start + width, V.shape[1]))
        yield cols, V[:, cols]


def write(
    out: torch.Tensor | None, V: torch.Tensor, cols: slice, layout: ParameterLayout,
    hv: Sequence[torch.Tensor | None], w: float, fresh: bool,
) -> torch.Tensor:  # fmt: skip
    """Add ``w · hv``, a block's per-parameter results, to columns ``cols`` of ``out`` (``fresh``: write it).

    ``out`` is :meth:`~hesd.operators.layout.ParameterLayout.result` for ``V``'s columns, made
    here on the first block (``None``): after that block's backward pass, so that it is not
    allocated beside the pass's own peak (one vector more at the peak when made before it,
    which the memory planner measured). ``fresh`` means that these columns hold nothing yet
    (the first batch), so they are written instead of added to and no zero fill is needed
    (``None``, a parameter the loss does not reach: zeros). Each ``hv[i]`` is shaped like its
    parameter, with a leading dimension of ``len(cols)`` when the block has several columns.
    Every parameter is written where it lies in each column: no flat copy of a column (0.5 GB
    at 124 M parameters), and with a half-precision model the results are accumulated in
    ``out``'s float32. Returns ``out``.
    """
    out = layout.result(V.shape[1]) if out is None else out
    for view, t in zip(layout.column_views(out[:, cols]), hv, strict=True):
        if t is None:
            if fresh:
                view.zero_()
            continue
        t = t.reshape(view.shape)  # a one-column result has no leading dimension: a view
        if not fresh:
            view.add_(t, alpha=w)
        elif w == 1.0:
            view.copy_(t)
        elif t.dtype == view.dtype:
            torch.mul(t, w, out=view)
        else:  # half precision: multiplied in float32, as it is added
            view.copy_(t).mul_(w)
    return out


def kept_graph_product(
    flat: torch.Tensor | None, layout: ParameterLayout, V: torch.Tensor, w: float, width: int,
    out: torch.Tensor | None,
) -> torch.Tensor | None:  # fmt: skip
    """``out + w · H_b V`` through one batch's kept first-order graph ``flat`` (``None``: :math:`H_b = 0`)."""
    if flat is None:
        return out
    fresh = out is None
    for cols, block in column_blocks(V, width):
        if block.shape[1] == 1:
            hv = torch.autograd.grad(flat, layout.params, grad_outputs=block[:, 0], retain_graph=True,
                                     allow_unused=True)  # fmt: skip
        else:
            hv = torch.autograd.grad(flat, layout.params, grad_outputs=block.T, retain_graph=True,
                                     allow_unused=True, is_grads_batched=True)  # fmt: skip
        out = write(out, V, cols, layout, hv, w, fresh)
    return out


def double_backward_product(
    objective: Objective, batch: LossBatch, index: int, V: torch.Tensor, w: float, width: int,
    out: torch.Tensor | None,
) -> torch.Tensor | None:  # fmt: skip
    """``out + w · H_b V`` by recomputing the batch's first-order graph, then one backward per block."""
    with torch.enable_grad():
        g = objective.gradient(objective.loss(batch, index), create_graph=True)
        return kept_graph_product(flat_graph(g), objective.layout, V, w, width, out)


def forward_over_reverse_product(
    objective: Objective, batch: LossBatch, index: int, V: torch.Tensor, w: float, width: int,
    out: torch.Tensor | None,
) -> torch.Tensor | None:  # fmt: skip
    """``out + w · H_b V`` by forward-over-reverse on one batch (``vmap`` over the columns of a block)."""
    layout = objective.layout
    primals = layout.values()
    grad_fn = torch.func.grad(lambda params: objective.loss(batch, index, params))

    def hvp(tangents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return torch.func.jvp(grad_fn, (primals,), (tangents,))[1]

    fresh = out is None
    for cols, block in column_blocks(V, width):
        if block.shape[1] == 1:
            hv = hvp(layout.as_dict(layout.unflatten(block[:, 0])))
        else:
            hv = torch.func.vmap(hvp)(layout.as_dict(layout.unflatten_columns(block)))
        out = write(out, V, cols, layout, [hv[n] for n in layout.names], w, fresh)
    return out


def graph_pass(state: FirstOrderState, objective: Objective, V: torch.Tensor, width: int) -> torch.Tensor:
    """:math:`HV` by double backward: kept graphs first, then the batches recomputed per product."""
    weight = objective.contract.weight
    out = None
    with torch.enable_grad():
        for kept in state.kept:
            out = kept_graph_product(kept.flat, objective.layout, V, weight(kept.count, state.total), width, out)
    if state.stream or not state.kept or state.stored:
        # Nothing kept at all (streaming, or double_backward): every batch from the data; else the stored ones.
        from_data = state.stream or not (state.kept or state.stored)
        todo = enumerate(objective.batches()) if from_data else enumerate(state.stored, start=len(state.kept))
        with objective.forward.state():
            for index, batch in todo:
                w = weight(batch.count, state.total)
                out = double_backward_product(objective, batch, index, V, w, width, out)
    return out if out is not None else torch.zeros_like(V)


def func_pass(state: FirstOrderState, objective: Objective, V: torch.Tensor, width: int) -> torch.Tensor:
    """:math:`HV` by forward-over-reverse, every batch recomputed (no kept graph).

    Inside :meth:`~hesd.operators.forward.ForwardContext.functional`: losses and kernels whose
    forward-mode derivative PyTorch lacks are replaced by equivalents that have one.
    """
    out = None
    with objective.forward.state(), objective.forward.functional(), torch.enable_grad():
        for index, batch in enumerate(objective.batches()):
            w = objective.contract.weight(batch.count, state.total)
            out = forward_over_reverse_product(objective, batch, index, V, w, width, out)
    return out if out is not None else torch.zeros_like(V)


#: the pass of each product method; ``"double_backward"`` is the graph pass with nothing kept.
PASSES: dict[str, Callable[[FirstOrderState, Objective, torch.Tensor, int], torch.Tensor]] = {
    "graph": graph_pass,
    "double_backward": graph_pass,
    "func": func_pass,
    "finite_difference": finite_difference_pass,
}
