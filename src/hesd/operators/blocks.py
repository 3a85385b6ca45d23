"""How the columns of a product ``H V`` go through the passes over the data.

:class:`BlockScheduler` takes ``V`` of shape ``(P, k)`` and runs it through a pass function
``run(method, V, width)`` (:data:`hesd.operators.products.PASSES`) in blocks of ``width``
columns: it feeds the two tuning machines (:mod:`hesd.operators.tuning`) the timings they ask
for, and when PyTorch cannot batch a model's second derivative it falls back, once, to a method
or a width that works (:mod:`hesd.operators.support`), with one logged note. It knows nothing
of models or data: tests drive it with a matrix for ``run`` and a cost model for ``timer``.

Examples:
    >>> import torch
    >>> from hesd.operators.blocks import BlockScheduler
    >>> A = torch.diag(torch.arange(1.0, 5.0))
    >>> widths = []
    >>> def run(method, V, width):
    ...     widths.append(V.shape[1])
    ...     return A @ V
    >>> s = BlockScheduler(single_method="graph", width=2)
    >>> bool(torch.equal(s.multiply(torch.eye(4), run), A)), widths
    (True, [4])
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable

import torch

from ..errors import HesdError
from .tuning import BlockMethodChoice, BlockWidthTrial

__all__ = ["BlockChoices", "BlockScheduler", "wall_clock"]

logger = logging.getLogger("hesd")

Run = Callable[[str, torch.Tensor, int], torch.Tensor]
Timer = Callable[[Callable[[], torch.Tensor], torch.Tensor], tuple[torch.Tensor, float]]


def wall_clock(fn: Callable[[], torch.Tensor], V: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``fn()`` and its wall time in seconds (a GPU synchronised before and after)."""
    cuda = V.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(V.device)
    t = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize(V.device)
    return result, time.perf_counter() - t


class BlockScheduler:
    """Columns into passes: block widths, the block method, and fallbacks (module docs).

    The pass function is given to each :meth:`multiply` call rather than kept, so that the
    scheduler holds no reference back to its operator (a cycle would keep an operator, its kept
    graphs and its process group alive until the garbage collector runs: under gloo that
    delayed teardown to interpreter exit and aborted processes).

    Args:
        single_method: the method for one column per pass.
        block_method: the method for blocks when fixed (``None``: ``method_choice`` decides).
        width: columns per pass when no trial runs.
        width_trial: the CPU's block-width trial, or ``None``.
        method_choice: the block-method choice (``hvp_method="auto"``), or ``None``.
        describe: ``describe(exc, fallback)`` returns the note for a failed batched pass.
        timer: ``timer(fn, V)`` returns ``(fn(), seconds)``; :func:`wall_clock` by default.

    Attributes:
        failure: the note logged when batched passes failed, else ``None``.
    """

    def __init__(
        self,
        *,
        single_method: str,
        block_method: str | None = None,
        width: int = 1,
        width_trial: BlockWidthTrial | None = None,
        method_choice: BlockMethodChoice | None = None,
        describe: Callable[[BaseException, str], str] | None = None,
        timer: Timer = wall_clock,
    ) -> None:
        self.timer = timer
        self.single_method, self.fixed_method = single_method, block_method
        self.width_trial, self.method_choice = width_trial, method_choice
        self._width = width
        self.describe = describe or (lambda exc, fallback: f"hesd: batched products failed ({exc}); using {fallback}")
        self.failure: str | None = None

    @property
    def width(self) -> int:
        """Columns per pass now (the trial's choice while it runs)."""
        return self.width_trial.width if self.width_trial is not None else self._width

    @width.setter
    def width(self, value: int) -> None:
        self._width, self.width_trial = value, None

    @property
    def block_method(self) -> str | None:
        """The method for blocks: fixed, chosen, or ``None`` while the choice is pending."""
        if self.method_choice is not None:
            return self.method_choice.method
        return self.fixed_method

    def multiply(self, V: torch.Tensor, run: Run) -> torch.Tensor:
        """``H V`` on this rank, the width trial run on the columns as they come.

        Args:
            V: ``(P, k)`` columns.
            run: ``run(method, V, width)`` returns ``H V`` on this rank by ``method`` in blocks of
                ``width`` columns.
        """
        if self.width_trial is not None and not self.width_trial.done and V.shape[1] > 1:
            return self._trial(V, run)
        return self._product(V, run)

    def _trial(self, V: torch.Tensor, run: Run) -> torch.Tensor:
        trial = self.width_trial
        assert trial is not None
        cols: list[torch.Tensor] = []
        j, n = 0, V.shape[1]
        while not trial.done and j < n:
            k = min(trial.next_width(), n - j)
            block = V[:, j : j + k]
            out, seconds = self.timer(functools.partial(self._product, block, run), block)
            cols.append(out)
            j += k
            trial.record(k, seconds)
        if j < n:
            cols.append(self._product(V[:, j:], run))
        return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)

    def _product(self, V: torch.Tensor, run: Run) -> torch.Tensor:
        width = self.width
        if V.shape[1] == 1 or width == 1:
            return run(self.single_method, V, 1)
        try:
            if self.method_choice is not None and not self.method_choice.done:
                return self._choose_method(V, width, run)
            return run(self.block_method or "graph", V, width)
        except RuntimeError as exc:
            if isinstance(exc, HesdError):
                raise
            return self._after_failure(exc, V, width, run)

    def _choose_method(self, V: torch.Tensor, width: int, run: Run) -> torch.Tensor:
        """Run :class:`BlockMethodChoice` on this block; returns the first product."""
        choice = self.method_choice
        assert choice is not None
        out: torch.Tensor | None = None
        while not choice.done:
            method = choice.next_method()
            try:
                result, seconds = self.timer(functools.partial(run, method, V, width), V)
            except RuntimeError as exc:
                if method == "graph" or isinstance(exc, HesdError):
                    raise
                result, seconds = None, math.inf  # vmap cannot run this model's blocks: keep the graph
            out = result if out is None else out
            choice.record(method, seconds)
        assert out is not None
        return out

    def _after_failure(self, exc: RuntimeError, V: torch.Tensor, width: int, run: Run) -> torch.Tensor:
        """A batched pass failed: say so once, and go on exactly.

        Where the method is chosen (``hvp_method="auto"``), a failed batched backward hands blocks
        to ``vmap`` of forward-over-reverse, which batches where the backward does not
        (GroupNorm); if that fails too, or the method was fixed, every column goes on its own.
        """
        if self.method_choice is not None and (self.block_method or "graph") == "graph":
            self.method_choice.settle("func")
            try:
                out = run("func", V, width)
            except RuntimeError as again:
                if isinstance(again, HesdError):
                    raise
                exc = again
            else:
                self._note(self.describe(exc, "func"))
                return out
        self._note(self.describe(exc, "columns"))
        self._width = 1
        if self.width_trial is not None:
            self.width_trial.give_up()
        return run(self.single_method, V, 1)

    def _note(self, note: str) -> None:
        self.failure = note
        logger.warning(note)


class BlockChoices:
    """The scheduler's choices, as made, read from an operator's ``blocks`` (a :class:`BlockScheduler`).

    A mixin of :class:`hesd.HessianOperator`, whose attributes these properties are.
    """

    blocks: BlockScheduler

    @property
    def batch_columns(self) -> int:
        """Columns per batched pass now (the CPU trial changes it until it decides)."""
        return self.blocks.width

    @batch_columns.setter
    def batch_columns(self, value: int) -> None:
        self.blocks.width = value

    @property
    def column_timings(self) -> dict[str, float]:
        """On the CPU with ``batch_columns=None``, the block-width trial's seconds per product.

        ``"single"`` once 8 single columns are timed, ``"block"`` once blocks are; empty before.
        """
        return self.blocks.width_trial.timings if self.blocks.width_trial is not None else {}

    @property
    def block_method(self) -> str | None:
        """How blocks of columns are multiplied: ``"graph"`` or ``"func"``.

        With ``hvp_method="auto"``, ``None`` until the first block product times both and chooses.
        """
        return self.blocks.block_method

    @property
    def block_timings(self) -> dict[str, float]:
        """Seconds of each block method tried by ``"auto"``."""
        return self.blocks.method_choice.timings if self.blocks.method_choice is not None else {}

    @property
    def batched_failure(self) -> str | None:
        """The note logged when batched products failed for this model, else ``None``."""
        return self.blocks.failure
