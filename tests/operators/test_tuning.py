"""Block width and block method: the state machines fed numbers, the scheduler driven by a matrix
and a cost model, and the operator's products through each choice against the dense Hessian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import hesd
from helpers import make_case
from hesd.operators.blocks import BlockScheduler
from hesd.operators.tuning import BlockMethodChoice, BlockWidthTrial

CE = nn.functional.cross_entropy


# ----------------------------------------------------------------------------------- state machines
def test_width_trial_keeps_blocks_that_are_cheaper_per_column():
    trial = BlockWidthTrial()
    assert [trial.next_width() for _ in range(1)] == [1]
    for seconds in (0.0012, 0.0010, 0.0011, 0.0013, 0.0010, 0.0011, 0.0012, 0.0010):
        trial.record(1, seconds)
    assert trial.timings == {"single": 0.0010} and trial.width == 8 and not trial.done
    trial.record(8, 1.0)  # the warm-up block: any time
    trial.record(1, 0.5)  # a lone column at the end of a call is no block
    trial.record(4, 0.0016)  # 0.4 ms a column
    assert not trial.done
    trial.record(8, 0.0048)  # 0.6 ms a column
    assert trial.done and trial.width == 8 and trial.timings == {"single": 0.0010, "block": 0.0004}


def test_width_trial_gives_up_blocks_that_do_not_pay_and_skips_expensive_products():
    trial = BlockWidthTrial()
    for _ in range(8):
        trial.record(1, 0.001)
    for seconds in (0.001, 0.0072, 0.0070):  # 0.875 ms a column > 0.8 x 1 ms
        trial.record(8, seconds)
    assert trial.done and trial.width == 1 and trial.timings["block"] == pytest.approx(0.0070 / 8)
    expensive = BlockWidthTrial()
    for _ in range(8):
        expensive.record(1, 0.006)  # over the 5 ms limit: blocks are never tried
    assert expensive.done and expensive.width == 1 and set(expensive.timings) == {"single"}
    with pytest.raises(ValueError, match="single column"):
        BlockWidthTrial().record(8, 0.1)


def test_method_choice_keeps_a_fast_graph_and_times_both_otherwise():
    fast = BlockMethodChoice()
    assert fast.next_method() == "graph"
    fast.record("graph", 0.01)
    assert fast.done and fast.method == "graph" and fast.timings == {"graph": 0.01}
    slow = BlockMethodChoice()
    order = []
    times = {"graph": iter([0.3, 0.2, 0.25]), "func": iter([9.0, 0.1, 0.15])}  # func's first run warms up
    while not slow.done:
        method = slow.next_method()
        order.append(method)
        slow.record(method, next(times[method]))
    assert order == ["graph", "func", "graph", "func", "graph", "func"]
    assert slow.method == "func" and slow.timings == {"graph": 0.2, "func": 0.1}
    failing = BlockMethodChoice()
    failing.record("graph", 0.3)
    failing.record("func", math.inf)  # vmap cannot run the model's blocks
    assert failing.method == "graph" and failing.timings == {"graph": 0.3}


# ----------------------------------------------------------------------------------- the scheduler
def _scheduler(cost, **kw):
    """A scheduler whose products "take" ``cost(k)`` seconds for ``k`` columns, so that its decisions
    are deterministic. Returns it, a dense symmetric matrix, the list each pass appends its number of
    columns to, and the pass function (products with the matrix)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    A = A + A.T
    widths: list[int] = []

    def run(method, V, width):
        widths.append(V.shape[1])
        return A @ V

    s = BlockScheduler(single_method="graph", block_method="graph", timer=lambda fn, V: (fn(), cost(V.shape[1])),
                       width_trial=BlockWidthTrial(max_seconds=1.0), **kw)  # fmt: skip
    return s, A, widths, run


def test_scheduler_keeps_blocks_when_a_pass_has_a_fixed_cost():
    """A fixed cost per pass (as Python and per-batch overhead are for a small model) makes a block of
    8 cheaper per product than 8 single passes: blocks are kept and used after."""
    s, A, widths, run = _scheduler(lambda k: 0.004)
    V = torch.randn(30, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(s.multiply(V, run), A @ V, atol=1e-12)
    # 8 single, a warm-up block, then the last 4 columns in the first timed block: undecided.
    assert widths == [1] * 8 + [8, 4] and s.width == 8 and set(s.width_trial.timings) == {"single"}
    widths.clear()
    assert torch.allclose(s.multiply(V, run), A @ V, atol=1e-12)
    # The second timed block decides; the other 12 columns go in one pass with the choice.
    assert widths == [8, 12] and s.width == 8
    assert s.width_trial.timings["block"] < 0.8 * s.width_trial.timings["single"]
    # One call of 41 columns holds the whole trial; the 9 columns after it go in one pass.
    wide, A, widths, run = _scheduler(lambda k: 0.004)
    V = torch.randn(30, 41, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert torch.allclose(wide.multiply(V, run), A @ V, atol=1e-12)
    assert wide.width == 8 and widths == [1] * 8 + [8, 8, 8, 9]


def test_scheduler_gives_up_blocks_that_cost_the_same_per_column():
    s, A, widths, run = _scheduler(lambda k: 0.004 * k)
    V = torch.randn(30, 34, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.allclose(s.multiply(V, run), A @ V, atol=1e-12)
    assert widths == [1] * 8 + [8, 8, 8] + [2] and s.width == 1  # the last 2 in single passes


def test_scheduler_falls_back_to_vmap_then_to_single_columns_when_batching_fails(caplog):
    A = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
    calls = []

    def run(method, V, width):
        calls.append((method, width))
        if width > 1 and method in broken:
            raise RuntimeError(f"{method} cannot batch this")
        return A @ V

    V = torch.randn(6, 5, dtype=torch.float64)
    broken = {"graph"}
    s = BlockScheduler(single_method="graph", width=4, method_choice=BlockMethodChoice())
    with caplog.at_level("WARNING", logger="hesd"):
        assert torch.allclose(s.multiply(V, run), A @ V)
        assert torch.allclose(s.multiply(V, run), A @ V)
    assert s.block_method == "func" and s.width == 4 and "graph cannot batch" in s.failure
    assert calls == [("graph", 4), ("func", 4), ("func", 4)] and len(caplog.records) == 1
    calls.clear()
    broken = {"graph", "func"}
    s = BlockScheduler(single_method="graph", width=4, method_choice=BlockMethodChoice())
    assert torch.allclose(s.multiply(V, run), A @ V) and torch.allclose(s.multiply(V, run), A @ V)
    assert s.width == 1 and "func cannot batch" in s.failure
    assert calls == [("graph", 4), ("func", 4), ("graph", 1), ("graph", 1)]
    fixed = BlockScheduler(single_method="graph", block_method="graph", width=4)
    assert torch.allclose(fixed.multiply(V, run), A @ V) and fixed.width == 1  # a fixed method: single columns
    with pytest.raises(hesd.HesdError):  # hesd's own errors are never swallowed

        def refuse(method, V, width):
            raise hesd.errors.NonFiniteLossError("nan")

        BlockScheduler(single_method="graph", width=4).multiply(V, refuse)


# ----------------------------------------------------------------------------------- through the operator
@pytest.mark.parametrize("min_seconds", [0.0, 10.0])  # always try vmap; never (a limit no machine reaches)
def test_auto_chooses_a_block_method_by_timing_and_stays_exact(min_seconds):
    model, batches, _ = make_case("cnn", seed=9)
    H = hesd.exact_hessian(model, CE, batches)
    op = hesd.HessianOperator(model, CE, batches, batch_columns=3)
    op.blocks.method_choice = BlockMethodChoice(min_seconds=min_seconds)
    assert op.block_method is None
    V = torch.randn(H.shape[0], 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    first = op @ V  # the first block is timed both ways, unless the batched backward is fast already
    if min_seconds == 0:
        assert op.block_method in ("graph", "func") and set(op.block_timings) == {"graph", "func"}
    else:  # the batched backward is under the limit, so vmap is not tried
        assert op.block_method == "graph" and set(op.block_timings) == {"graph"}
    second = op @ V  # later blocks use the chosen method
    for HV in (first, second):
        assert (HV - H @ V).abs().max() < 1e-10 * max(1.0, float(H.abs().max()))
    assert op.num_matvecs == 10
    single = hesd.HessianOperator(model, CE, batches, batch_columns=1)
    single @ V
    assert single.block_method is None  # one column per pass: nothing to choose
    assert hesd.HessianOperator(model, CE, batches, hvp_method="func").block_method == "func"


def test_cpu_block_width_is_chosen_over_the_first_calls_and_stays_exact():
    model, batches, _ = make_case("mlp", seed=11)
    H = hesd.exact_hessian(model, CE, batches)
    op = hesd.HessianOperator(model, CE, batches)
    assert op.batch_columns == 1 and op.column_timings == {} and op.default_lockstep == 1
    op.blocks.width_trial = BlockWidthTrial(max_seconds=1.0)  # the 5 ms limit is not what this test checks
    V = torch.randn(H.shape[0], 36, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    op @ V[:, 0]  # one column: nothing to decide
    assert op.column_timings == {}
    tol = 1e-10 * max(1.0, float(H.abs().max()))
    # Calls of 8 columns, as hesd.trace makes them: 8 single, a warm-up block, two timed blocks.
    for start, timings in zip(range(0, 36, 8), [{"single"}] * 3 + [{"single", "block"}] * 2, strict=True):
        HV = op @ V[:, start : start + 8]
        assert (HV - H @ V[:, start : start + 8]).abs().max() < tol
        assert set(op.column_timings) == timings
    gain = BlockWidthTrial().gain
    assert op.batch_columns == (8 if op.column_timings["block"] <= gain * op.column_timings["single"] else 1)
    assert op.num_matvecs == 37  # every trial product is a real one
    assert (op @ V - H @ V).abs().max() < tol
    assert op.default_lockstep == 1  # SLQ's default does not follow the choice
    assert hesd.slq(op, 5, 2, seed=0).info["lockstep"] == 1
    # Calls that never hold 8 columns (lockstep SLQ with 3 probes) decide too.
    narrow = hesd.HessianOperator(model, CE, batches)
    narrow.blocks.width_trial = BlockWidthTrial(max_seconds=1.0)
    res = hesd.slq(narrow, 8, 3, seed=0, lockstep=3)
    assert set(narrow.column_timings) == {"single", "block"} and narrow.batch_columns in (1, 8)
    ref = hesd.slq(H, 8, 3, seed=0)
    for got, want in zip(res.values, ref.values, strict=True):
        assert np.allclose(got, want, atol=1e-9)


def test_cpu_block_width_is_not_tried_for_expensive_products_or_a_given_width():
    model, batches, _ = make_case("cnn", seed=13)
    H = hesd.exact_hessian(model, CE, batches)
    V = torch.randn(H.shape[0], 9, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    op = hesd.HessianOperator(model, CE, batches)
    op.blocks.width_trial = BlockWidthTrial(max_seconds=0.0)  # every product counts as expensive
    assert (op @ V - H @ V).abs().max() < 1e-10 * max(1.0, float(H.abs().max()))
    assert op.batch_columns == 1 and set(op.column_timings) == {"single"}
    given = hesd.HessianOperator(model, CE, batches, batch_columns=1)
    assert (given @ V - H @ V).abs().max() < 1e-10 * max(1.0, float(H.abs().max()))
    assert given.column_timings == {} and given.batch_columns == 1
