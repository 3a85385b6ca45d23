"""The memory planner: measured footprints, the ladder of plans, the estimate against the allocations a run
makes, flat memory over many products, and the error when nothing fits."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import hesd
from hesd.analysis.memory_plan import MARGIN, plan_memory
from hesd.operators.footprint import allocation_peak, measure_footprint
from hf_models import batches, tiny

CPU = torch.device("cpu")


def _gpt2(rows=(4, 4, 4), length=24):
    tf = pytest.importorskip("transformers")

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=97, n_positions=length, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1)  # fmt: skip
    model = tf.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    data = []
    for n in rows:
        ids = torch.randint(2, 97, (n, length), generator=g)
        labels = ids.clone()
        labels[:, -3:] = -100
        data.append({"input_ids": ids, "labels": labels})
    return model, data


def test_allocation_peak_sees_an_allocation_and_its_release():
    def work():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(500_000)  # 2 MB while a is alive
        del a, b
        return torch.empty(250_000)

    out, peak = allocation_peak(work, CPU)
    assert out.numel() == 250_000 and 6_000_000 <= peak < 6_400_000


def test_footprint_graph_is_what_the_operator_keeps_and_scales_with_tokens():
    model, data = _gpt2(rows=(4,))
    op = hesd.HessianOperator(model, None, data, hvp_method="graph")
    fp = measure_footprint(op)
    assert fp.graph == pytest.approx(op.graph_bytes, rel=0.05)  # fitted on 1 and 2 rows, told at 4
    assert fp.tokens == [96] and fp.rows == [4] and fp.length == 24 and fp.dim == op.shape[0]
    assert 0 < fp.kept_product < fp.recompute_product and 0 < fp.fd_product < fp.recompute_product
    cut = measure_footprint(hesd.HessianOperator(model, None, data, max_tokens=48))
    assert cut.tokens == [48, 48]
    assert cut.graph == pytest.approx(fp.graph / 2, rel=0.1)  # activations are linear in tokens
    before = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_plan_under_bfloat16_autocast_is_measured_so_and_passes_it_on():
    model, data = _gpt2(rows=(4,), length=64)
    full = plan_memory(model, None, data, num_steps=10, max_memory=2**30)
    half = plan_memory(model, None, data, num_steps=10, max_memory=2**30, autocast_dtype=torch.bfloat16)
    assert full.footprint is not None and half.footprint is not None
    assert half.footprint.graph < 0.8 * full.footprint.graph, (half.footprint.graph, full.footprint.graph)
    assert half.operator_kwargs()["autocast_dtype"] == torch.bfloat16 and "autocast_dtype" not in full.operator_kwargs()
    assert any("bfloat16 autocast" in c for c in half.choices)
    op = hesd.HessianOperator(model, None, data, **half.operator_kwargs())
    assert op.graph_bytes == pytest.approx(half.footprint.graph, rel=0.1)


def test_the_plan_ladder_from_all_graphs_kept_to_an_error():
    model, data = _gpt2()
    steps = 40
    roomy = plan_memory(model, None, data, num_steps=steps, max_memory=2**30)
    fp = roomy.footprint
    assert fp is not None and roomy.hvp_method == "auto" and roomy.basis["reorth"] == "full"
    assert "every first-order graph kept" in roomy.choices[0]
    basis = steps * fp.dim * 4
    fixed = roomy.parts["gradient"] + roomy.parts["Lanczos vectors"] + basis
    budgets = {
        "some graphs": (fixed + fp.recompute_product + fp.graph) / (1 - MARGIN),
        "micro-batches": (fixed + fp.recompute_product * 0.6) / (1 - MARGIN),
        "reduced basis": (basis * 0.8) / (1 - MARGIN),
    }
    some = plan_memory(model, None, data, num_steps=steps, max_memory=int(budgets["some graphs"]))
    assert some.hvp_method == "auto" and 0 < some.graph_budget < sum(fp.graph for _ in fp.tokens)
    cut = plan_memory(model, None, data, num_steps=steps, max_memory=int(budgets["micro-batches"]))
    assert cut.max_tokens is not None and cut.max_tokens < 96 and cut.max_tokens % 24 == 0
    assert cut.hvp_method == "double_backward" and cut.basis["reorth"] == "full" and "micro-batches" in cut.choices[0]
    small = plan_memory(model, None, data, num_steps=steps, max_memory=int(budgets["reduced basis"]))
    assert small.basis["basis_dtype"] == torch.bfloat16 or small.basis["reorth"] == "window"
    assert any("does not fit" in c for c in small.choices)
    for plan in (roomy, some, cut, small):
        assert plan.total <= plan.budget * (1 - MARGIN) + 1
    with pytest.raises(hesd.MemoryBudgetError) as info:
        plan_memory(model, None, data, num_steps=steps, max_memory=fp.dim * 4)
    message = str(info.value)
    for needed in (f"{fp.dim:,} analysed parameters", "basis", "product", "Options:", "--max-memory", "--steps"):
        assert needed in message, needed


def test_finite_differences_are_planned_when_asked_or_when_nothing_exact_runs():
    model, data = _gpt2(rows=(4,))
    plan = plan_memory(model, None, data, num_steps=20, max_memory=2**30, hvp_method="finite_difference")
    assert plan.hvp_method == "finite_difference" and plan.parts["kept graphs"] == 0
    g = torch.Generator().manual_seed(0)
    T, N, C = 6, 3, 4
    lin = torch.nn.Linear(3, C)
    ctc_data = (torch.randn(N, T, 3, generator=g), torch.randint(1, C, (N, 3), generator=g))

    def ctc(out, y):
        return F.ctc_loss(out.log_softmax(-1).transpose(0, 1), y, [T] * len(y), [3] * len(y))

    plan = plan_memory(lin, ctc, ctc_data, num_steps=10, max_memory=2**28)
    assert plan.hvp_method == "finite_difference" and plan.footprint is not None
    assert plan.footprint.recompute_product is None  # no double backward through ctc_loss


@pytest.mark.parametrize("budget_mib", [200, 6])
def test_the_estimate_matches_what_the_run_allocates(budget_mib):
    """Allocator bytes of the whole run (operator, first-order pass, 12-step SLQ) within ±25 % of the plan."""
    model, data = _gpt2()
    steps = 12
    plan = plan_memory(model, None, data, num_steps=steps, max_memory=budget_mib * 2**20)

    def run():
        op = hesd.HessianOperator(model, None, data, **plan.operator_kwargs())
        return hesd.slq(op, steps, 1, seed=0, **plan.slq_kwargs())

    _, peak = allocation_peak(run, CPU)
    assert 0.75 * plan.total <= peak <= 1.25 * plan.total, (plan.describe(), peak)
    assert peak <= plan.budget


def test_the_top_eigenvalue_phase_stays_within_the_plan():
    """The restarted Lanczos after the SLQ gets the SLQ basis's bytes (``eigen_basis``) and, restarts
    included, allocates no more than the plan (a restart rotates the basis in place)."""
    model, data = _gpt2()
    plan = plan_memory(model, None, data, num_steps=40, max_memory=4 * 2**20)
    assert plan.basis["reorth"] == "window" and plan.footprint is not None  # the basis sized down
    vec = plan.footprint.dim * plan.footprint.vector_item
    assert 6 < plan.eigen_basis == plan.basis["basis_bytes"] // vec - 1 < 40

    def run():
        op = hesd.HessianOperator(model, None, data, **plan.operator_kwargs())
        return hesd.eigenvalues(op, k=2, which="BE", tol=1e-6, max_basis=plan.eigen_basis, max_matvecs=80, warn=False)

    res, peak = allocation_peak(run, CPU)
    assert res.info["restarts"] > 0 and res.info["basis_size"] == plan.eigen_basis
    assert peak <= 1.25 * plan.total, (plan.describe(), peak)


def test_the_extreme_values_follow_the_slq_basis_a_window_where_it_is_one():
    """``extremes_kwargs``: under a plan whose SLQ basis is a window, λmin and λmax by windowed Lanczos (three
    vectors, within the plan, the values of the restarted method); where the full basis fits, the restart basis."""
    model, data = _gpt2()
    plan = plan_memory(model, None, data, num_steps=40, max_memory=4 * 2**20)
    assert plan.basis["reorth"] == "window" and plan.extremes_kwargs() == {"reorth": "window"}

    def run(**kw):
        op = hesd.HessianOperator(model, None, data, **plan.operator_kwargs())
        return hesd.eigenvalues(op, k=2, which="BE", tol=1e-6, max_matvecs=200, warn=False, **kw)

    window, peak = allocation_peak(lambda: run(**plan.extremes_kwargs()), CPU)
    assert window.converged and window.info == {"restarts": 0, "basis_size": 3}
    assert peak <= 1.25 * plan.total, (plan.describe(), peak)
    full = run(max_basis=plan.eigen_basis)
    scale = float(full.eigenvalues.abs().max())
    assert torch.allclose(window.eigenvalues, full.eigenvalues, rtol=0, atol=1e-5 * scale)
    roomy = plan_memory(model, None, data, num_steps=40, max_memory=2**30)
    assert roomy.basis["reorth"] == "full" and roomy.extremes_kwargs() == {"max_basis": roomy.eigen_basis}


def test_the_landscape_eigen_solver_is_planned_too():
    """``loss_landscape(max_memory=...)``: the eigen solver's products and restart basis come from a plan, so it
    stays within the budget; the directions' eigenvalues are those of the unplanned solver."""
    from hesd.analysis.landscape import loss_landscape

    model, data = _gpt2()
    budget = 6 * 2**20
    plan = plan_memory(model, None, data, num_steps=40, max_memory=budget)
    assert plan.eigen_basis < 40
    planned, peak = allocation_peak(lambda: loss_landscape(model, None, data, num=3, num_2d=2, max_memory=budget), CPU)
    free = loss_landscape(model, None, data, num=3, num_2d=2)
    assert peak <= 1.25 * plan.total, (plan.describe(), peak)
    assert planned["eigenvalues"] == pytest.approx(free["eigenvalues"], rel=1e-3)


def test_memory_is_flat_over_many_products():
    model, data = _gpt2(rows=(2, 2), length=12)
    op = hesd.HessianOperator(model, None, data)
    v = torch.randn(op.shape[0])
    op @ v  # the first-order pass and its kept graphs
    _, one = allocation_peak(lambda: op @ v, CPU)

    def many():
        for _ in range(100):
            op @ v

    _, hundred = allocation_peak(many, CPU)
    assert hundred <= one * 1.05 + 4096  # nothing accumulates between products


def test_analyze_model_follows_the_plan_and_says_what_it_chose(caplog):
    pytest.importorskip("transformers")
    model = tiny("gpt2", torch.float64)
    data = batches("gpt2")
    settings = hesd.AnalysisSettings(num_steps=20, num_probes=1, refine_extremes=False)
    free, _ = hesd.analyze_model(model, data, loss_fn=None, settings=settings)
    roomy = plan_memory(model, None, data, num_steps=20, max_memory=2**30)
    fp = roomy.footprint
    assert fp is not None and fp.recompute_product is not None
    need = roomy.parts["gradient"] + roomy.parts["Lanczos vectors"] + fp.recompute_product + 0.6 * roomy.parts["basis"]
    tight = hesd.AnalysisSettings(num_steps=20, num_probes=1, refine_extremes=False, max_memory=int(need / 0.9))
    with caplog.at_level(logging.WARNING, logger="hesd"):
        row, _ = hesd.analyze_model(model, data, loss_fn=None, settings=tight)
    notes = [r.getMessage() for r in caplog.records if "memory plan" in r.getMessage()]
    assert len(notes) == 1 and "does not fit" in notes[0]
    assert row["slq_lambda_max"] == pytest.approx(free["slq_lambda_max"], rel=2e-2)
    with pytest.raises(hesd.MemoryBudgetError, match="no plan fits"):
        hesd.analyze_model(model, data, loss_fn=None, settings=hesd.AnalysisSettings(num_steps=20, max_memory=1000))
