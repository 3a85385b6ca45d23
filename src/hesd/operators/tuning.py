r"""Choices an operator makes from its own timings, as state machines fed numbers.

Neither machine calls a product or reads a clock: the operator asks what to run next, runs
it, and reports the seconds it took. Tests drive them with numbers.

:class:`BlockWidthTrial` (CPU, ``batch_columns=None``) decides, over the first products of
several columns, whether blocks of 8 columns per pass beat one column per pass:

1. The first 8 columns go one at a time and are timed (the minimum counts). If a product
   takes more than ``max_seconds`` (5 ms), one column per pass is kept: on the CPU blocks
   lost for every expensive model measured, and trying them would cost seconds.
2. Otherwise the next columns go in blocks of up to 8 (fewer at the end of a call). The first
   block warms the batched backward up; the next two are timed, per column. A block narrower
   than 8 amortises less, so its timing errs towards one column per pass, but calls that never
   hold 8 columns (``slq(..., lockstep=3)``) still reach a decision. A lone column at the end
   of a call is no block and is not counted.
3. Blocks are kept when the faster timed block costs at most ``gain`` (0.8) of a single
   product per column: a marginal difference is noise at sub-millisecond times.

Every trial product multiplies a real column, so nothing is thrown away; ``hesd.trace``'s calls
of 8 columns reach the decision within Hutch++'s first 4 calls.

:class:`BlockMethodChoice` (``hvp_method="auto"``, the first block of several columns) times
the kept-graph batched backward against ``vmap`` of forward-over-reverse. A block that the
batched backward multiplies in under ``min_seconds`` (50 ms) keeps it without trying ``vmap``,
whose cold start costs seconds on a GPU. Otherwise ``vmap`` runs once to warm up, then both
twice, alternating; the faster minimum wins. The first product's result is the answer.

The measurements behind each number are in BENCHMARKS.md §1.

Examples:
    >>> from hesd.operators.tuning import BlockWidthTrial
    >>> trial = BlockWidthTrial()
    >>> for _ in range(8):
    ...     trial.record(trial.next_width(), 0.001)  # eight single columns of 1 ms
    >>> trial.next_width()
    8
    >>> for seconds in (0.004, 0.004, 0.004):  # a warm-up block, then two timed blocks of 8
    ...     trial.record(8, seconds)
    >>> trial.done, trial.width, trial.timings
    (True, 8, {'single': 0.001, 'block': 0.0005})
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import HesdValueError

__all__ = ["BlockMethodChoice", "BlockWidthTrial"]


@dataclass
class BlockWidthTrial:
    """Single columns against blocks, decided across calls (module docs).

    Attributes:
        block: the block width tried.
        max_seconds: single products slower than this keep one column per pass.
        gain: blocks are kept only at most this fraction of a single product per column.
        width: the width to use from now on (1 until blocks are tried).
        done: whether the decision is made.
        timings: seconds per product: ``"single"`` once 8 single columns are timed, ``"block"``
            once blocks are.
    """

    block: int = 8
    max_seconds: float = 0.005
    gain: float = 0.8
    width: int = 1
    done: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    singles: list[float] = field(default_factory=list)
    blocks_seen: int = 0
    block_times: list[float] = field(default_factory=list)

    def next_width(self) -> int:
        """How many columns the next trial product should take (``1`` or ``block``)."""
        return 1 if len(self.singles) < self.block else self.block

    def record(self, k: int, seconds: float) -> None:
        """Report that a trial product of ``k`` columns took ``seconds``."""
        if self.done:
            return
        if len(self.singles) < self.block:
            if k != 1:
                raise HesdValueError(f"BlockWidthTrial: expected a single column, got {k}")
            self.singles.append(seconds)
            if len(self.singles) == self.block:
                self.timings["single"] = min(self.singles)
                if self.timings["single"] > self.max_seconds:
                    self.done = True  # expensive products: one column per pass
                else:
                    self.width = self.block  # blocks from here on, while they are tried
            return
        if k == 1:
            return  # a lone column at the end of a call is no block
        self.blocks_seen += 1
        if self.blocks_seen > 1:  # the first block warms up
            self.block_times.append(seconds / k)
        if len(self.block_times) == 2:
            self.timings["block"] = min(self.block_times)
            if self.timings["block"] > self.gain * self.timings["single"]:
                self.width = 1
            self.done = True

    def give_up(self) -> None:
        """Blocks cannot be used (a batched product failed): one column per pass, for good."""
        self.width, self.done = 1, True


@dataclass
class BlockMethodChoice:
    """The batched backward (``"graph"``) against ``vmap`` of forward-over-reverse (``"func"``).

    Attributes:
        min_seconds: a first graph block faster than this keeps the graph without trying ``func``.
        method: the choice, ``None`` until made.
        timings: the minimum seconds of each method tried.
    """

    min_seconds: float = 0.05
    method: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    plan: list[str] = field(default_factory=list)
    times: dict[str, list[float]] = field(default_factory=lambda: {"graph": [], "func": []})
    runs: int = 0
    first: float = 0.0

    @property
    def done(self) -> bool:
        """Whether the method is chosen."""
        return self.method is not None

    def next_method(self) -> str:
        """Which method the next timed block product should use."""
        if self.runs == 0:
            return "graph"
        return self.plan[0]

    def settle(self, method: str) -> None:
        """Take ``method`` without (more) timings: the other cannot multiply this model's blocks."""
        self.method, self.timings, self.plan = method, {}, []

    def record(self, method: str, seconds: float) -> None:
        """Report that a block product by ``method`` took ``seconds`` (``math.inf``: it failed)."""
        self.runs += 1
        if self.runs == 1:
            self.first = seconds
            if seconds < self.min_seconds:
                self.method, self.timings = "graph", {"graph": seconds}
            else:
                self.plan = ["func", "graph", "func", "graph", "func"]  # warm-up, then alternate
            return
        self.plan.pop(0)
        if math.isinf(seconds):  # vmap of forward-over-reverse cannot run this model's blocks
            self.method, self.timings = "graph", {"graph": self.first}
            return
        if self.runs > 2:  # the func warm-up does not count
            self.times[method].append(seconds)
        if not self.plan:
            t_graph, t_func = min(self.times["graph"]), min(self.times["func"])
            self.method = "func" if t_func < t_graph else "graph"
            self.timings = {"graph": t_graph, "func": t_func}
