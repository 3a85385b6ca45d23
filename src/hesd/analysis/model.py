"""Analyse one model at its current parameters: spectrum, criteria, type, extremes, held-out metrics."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..algorithms.eigen import eigenvalues
from ..algorithms.slq import plan_basis, slq
from ..algorithms.spectrum import Spectrum
from ..collectives import rank_and_world
from ..errors import HesdValueError
from ..operators import HessianOperator, ParameterLayout
from ..operators.data import ModelCall, as_reiterable
from ..operators.forward import model_state
from ..operators.fsdp import FSDPHessianOperator, is_fsdp_model
from ..operators.loss import PairLoss
from ..operators.model_loss import loss_contract, mean_loss
from ..operators.sharded import ShardedOperator
from .baselines import random_sharpness
from .criteria import compare_criteria, criteria, probe_summary, undetermined_reason
from .memory_plan import LANCZOS_VECTORS, available_memory, plan_for_settings
from .settings import AnalysisSettings

__all__ = ["analyze_model", "check_inputs", "select_params"]

logger = logging.getLogger("hesd")


def _tight(s: AnalysisSettings, layout: ParameterLayout) -> bool:
    """Whether the full Lanczos basis alone would take most of the free memory (then a plan is made)."""
    lockstep = min(s.num_probes, 8 if layout.device.type == "cuda" else 1)  # HessianOperator.default_lockstep
    dtype = layout.dtype if layout.dtype.itemsize >= 4 else torch.float32  # half models: products in float32
    basis = plan_basis(layout.dim, s.num_steps, dtype, 2**62)["basis_bytes"] * lockstep
    return basis + LANCZOS_VECTORS * layout.dim * 8 > 0.8 * available_memory(layout.device)


def _norm(op: Any, v: torch.Tensor) -> float:
    """The Euclidean norm of a whole vector of which ``v`` is this rank's rows (``v`` itself unless sharded)."""
    return float(torch.sqrt(op.reduce_inner((v.double() ** 2).sum().reshape(1)))[0])


def _fsdp_operator(model: nn.Module, loss_fn: Any, data: Any, s: AnalysisSettings, process_group: Any) -> Any:
    """The operator for a model sharded by FSDP2: shard-local finite differences, vectors sharded like it."""
    refused = {"process_group": process_group is not None, f"params={s.params!r}": bool(s.params),
               f"hvp_method={s.hvp_method!r}": s.hvp_method not in ("auto", "finite_difference"),
               f"model_mode={s.model_mode!r}": s.model_mode != "eval"}  # fmt: skip
    if any(refused.values()):
        raise HesdValueError(
            f"analyze_model: the model is sharded by FSDP2 (fully_shard), which takes "
            f"{', '.join(k for k, v in refused.items() if v)} not: its products are shard-local finite differences "
            "of all its parameters in eval mode over the ranks of its device mesh. Leave these at their defaults "
            "(the mesh's ranks are the data-parallel group), or analyse an unsharded copy"
        )
    if s.max_memory is not None:
        logger.info("hesd: an FSDP2 model is not planned (max_memory): its basis is already divided like its shards")
    return FSDPHessianOperator(model, loss_fn, data)


def _heldout_eval(model: nn.Module, data: Iterable, loss_fn: Any, device, dtype) -> dict[str, float]:
    """Held-out loss over all loss-bearing items (the training loss's contract) and, for classifiers, accuracy.

    Accuracy is recorded for ``loss_fn(outputs, targets)`` with ``(batch, classes)`` outputs and
    integer targets; otherwise only the loss (selection then uses it, :class:`hesd.BestHeldout`).
    """
    contract = loss_contract(loss_fn, "heldout")
    contract.bind(model)
    data = as_reiterable(data, "heldout")
    if not isinstance(contract, PairLoss):  # the model's own loss or fn(model, batch): no outputs to score
        with model_state(model, "eval"):
            return {"heldout_loss": mean_loss(model, contract, data, device, dtype)[0]}
    total, loss_sum, correct, classify, structured = 0, 0.0, 0, True, False
    with torch.no_grad(), model_state(model, "eval"):
        for raw in data:
            batch = contract.prepare(raw, device, dtype)
            if batch is None:
                continue
            out = ModelCall(model).on(batch.inputs)
            y = batch.targets
            if classify and isinstance(out, torch.Tensor) and out.ndim == 2 and not y.is_floating_point():
                correct += int((out.argmax(1) == y).sum())
            else:
                classify, structured = False, structured or not isinstance(out, torch.Tensor)
            loss_sum += contract.weight(batch.count, 1.0) * float(loss_fn(out, y))
            total += batch.count
    res = {"heldout_loss": loss_sum / max(total, 1)}
    if classify:
        res["heldout_accuracy"] = correct / max(total, 1)
    elif structured:
        logger.warning(
            "hesd: the model returns %s, not a (batch, classes) tensor: held-out accuracy cannot be computed; "
            "recording held-out loss only (the held-out pick uses it)",
            type(out).__name__,
        )
    return res


def analyze_model(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: Any = nn.functional.cross_entropy,
    heldout: Any = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    settings: AnalysisSettings | None = None,
    callback: Callable[[int, int], None] | None = None,
    process_group: Any = None,
) -> tuple[dict, Spectrum]:
    """Analyse ``model`` at its current parameters.

    With ``process_group`` each rank passes its shard of ``data`` (data parallel, see
    :mod:`hesd.distributed`); every rank returns the same row. Held-out metrics are computed
    on each rank's ``heldout`` as given (pass the whole held-out set on every rank).

    A model sharded by FSDP2 (``fully_shard``, under ``torchrun``) is recognised: each rank
    passes its shard of ``data`` and no ``process_group`` (the ranks are the model's device
    mesh); products are shard-local finite differences
    (:class:`hesd.operators.fsdp.FSDPHessianOperator`), the Lanczos basis is sharded like the
    parameters, and every rank returns the row one process would compute on all the data.
    ``sharpness_random`` is NaN there (the perturbed loss would need every rank's data); the
    held-out criteria use the whole held-out set on every rank.

    Returns:
        ``(row, spectrum)``: ``row`` holds λmin, λmax, trace (SLQ estimate ± standard error
        over probes), re, KH05, Khn, Ct (with spreads), HESD type, stability, loss,
        gradient norm, held-out metrics, HVP count and time; ``spectrum`` is the SLQ
        :class:`hesd.Spectrum`.

    Examples:
        >>> import torch, hesd
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> row, spec = hesd.analyze_model(model, data, settings=hesd.AnalysisSettings(num_steps=20, num_probes=2))
        >>> row["hesd_type"] in ("MP", "MN"), spec.num_probes
        (True, 2)
    """
    s = settings or AnalysisSettings()
    t0 = time.perf_counter()
    fsdp = is_fsdp_model(model)
    data = as_reiterable(data, "analyze_model", allow_empty=process_group is not None or fsdp)
    slq_kw: dict[str, Any] = {"reorth": s.reorth, "window": s.window}
    op_kw: dict[str, Any] = {"hvp_method": s.hvp_method}
    plan, names = None, None
    op: Any
    if fsdp:
        op = _fsdp_operator(model, loss_fn, data, s, process_group)
    else:
        layout = ParameterLayout.select(model, list(s.params) if s.params else None, "analyze_model")
        names = layout.names if s.params else None
        if s.max_memory is not None or _tight(s, layout):
            plan = plan_for_settings(model, loss_fn, data, s, names, rank_and_world(process_group)[1])
            slq_kw, op_kw = plan.slq_kwargs(), plan.operator_kwargs()
        op = HessianOperator(model, loss_fn, data, model_mode=s.model_mode, process_group=process_group,
                             params=names, **op_kw)  # fmt: skip
    basis_kw = dict(slq_kw)
    if s.stop_tol is not None:
        slq_kw.update(stop_tol=s.stop_tol, stop_on=lambda v, w: probe_summary(v, w, s.n))
    # Data parallel: each rank keeps its block of every Lanczos vector (the basis divided by the world).
    sharded = ShardedOperator(op) if rank_and_world(process_group)[1] > 1 else op
    spec = slq(sharded, s.num_steps, s.num_probes, seed=s.seed, callback=callback, **slq_kw)
    crit = criteria(spec, s.n, s.ct_threshold, aggregate=s.aggregate, zero_band=s.zero_band, lr=s.lr)
    row: dict[str, Any] = crit.to_dict()
    row["slq_lambda_min"], row["slq_lambda_max"] = crit.lambda_min, crit.lambda_max
    if s.refine_extremes:
        ends = eigenvalues(op, k=2, which="BE", tol=s.extreme_tol, seed=s.seed, warn=False,
                           **(plan.extremes_kwargs() if plan is not None else {}))  # fmt: skip
        lo, hi = float(ends.eigenvalues[0]), float(ends.eigenvalues[1])
        row.update(lambda_min=lo, lambda_max=hi, width=hi - lo, extremes_converged=bool(ends.converged))
        row["stable_step"] = 2.0 / hi if hi > 0 else math.inf
        if s.lr is not None:
            row["eos_ratio"] = s.lr * hi / 2
    dim = spec.dim if spec.dim is not None else op.full_dim
    row["param_norm"] = _norm(op, op.vector() if op.sharded else op.layout.vector())
    row["type_reason"] = undetermined_reason(row["lambda_min"], row["lambda_max"], row["param_norm"], s.num_steps,
                                             dim, s.zero_curvature) or None  # fmt: skip
    if row["type_reason"]:
        row["hesd_type"] = "undetermined"
    per_probe_trace = [dim * float(np.sum(w * v)) for v, w in zip(spec.values, spec.weights, strict=True)]
    row["trace"] = float(np.mean(per_probe_trace))
    row["trace_se"] = float(np.std(per_probe_trace, ddof=1) / math.sqrt(len(per_probe_trace))) \
        if len(per_probe_trace) > 1 else math.nan  # fmt: skip
    row["train_loss"] = op.loss()
    row["grad_norm"] = _norm(op, op.gradient())
    row["num_params"] = op.full_dim
    row["num_samples"] = op.num_samples
    row["sharpness_random"] = math.nan  # data parallel or FSDP: each rank holds a shard, and the loss is local
    if s.sharpness_draws and process_group is None and not op.sharded:
        row["sharpness_random"] = random_sharpness(model, loss_fn, data, draws=s.sharpness_draws, seed=s.seed,
                                                   params=names, model_mode=s.model_mode)  # fmt: skip
    metrics: dict[str, float] = {}
    if evaluate is not None:
        metrics = {f"heldout_{k}" if not k.startswith("heldout_") else k: float(v) for k, v in evaluate(model).items()}
    elif heldout is not None:
        metrics = _heldout_eval(model, heldout, loss_fn, op.device, op.dtype if op.sharded else op.layout.dtype)
    row.update(metrics)
    if s.heldout_criteria and heldout is not None:
        hop = (
            FSDPHessianOperator(model, loss_fn, heldout)
            if op.sharded  # every rank the whole held-out set
            else HessianOperator(model, loss_fn, heldout, model_mode=s.model_mode, **op_kw)
        )  # held-out: local
        hspec = slq(hop, s.num_steps, s.num_probes, seed=s.seed, **basis_kw)
        hcrit = criteria(hspec, s.n, s.ct_threshold, aggregate=s.aggregate, zero_band=s.zero_band, lr=s.lr)
        row.update({k: v for k, v in compare_criteria(crit, hcrit).items() if not k.startswith("train_")})
        row["heldout_spectrum"] = hspec.to_dict()
        row["hvps_heldout"] = hop.num_matvecs
    row["hvps"] = op.num_matvecs
    row["seconds"] = time.perf_counter() - t0
    return row, spec


def check_inputs(model: nn.Module, data: Any, loss_fn: Any, params: Any = None, caller: str = "analyze") -> None:
    """Evaluate the loss on the first batch of ``data`` once, before any long work.

    A wrong batch format, labels out of range, mismatched shapes or a ``params`` selection that
    matches nothing then stop the run up front with the cause, instead of failing every
    checkpoint the same way. An empty shard (data parallelism) checks nothing.

    Raises:
        HesdValueError: the data, the loss and the model do not work together (the message says why).
    """
    try:
        layout = ParameterLayout.select(model, list(params) if params else None, caller)
        contract = loss_contract(loss_fn, caller)
        contract.bind(model)
        for raw in as_reiterable(data, caller, allow_empty=True):
            batch = contract.prepare(raw, layout.device, layout.dtype)
            if batch is None:
                continue
            with torch.no_grad(), model_state(model, "eval"):
                loss = contract.loss(ModelCall(model), batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise HesdValueError(f"the loss is not a scalar (got {getattr(loss, 'shape', type(loss).__name__)})")
            return
    except HesdValueError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise HesdValueError(
            f"{caller}: the data and the loss do not work with the model on the first batch ({type(exc).__name__}: "
            f"{first}). Check the batch format ((inputs, targets), or dict batches with loss_fn=None), the labels' "
            "range and the shapes; nothing was analysed"
        ) from None


def select_params(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the trainable parameters that ``patterns`` select (names or ``fnmatch`` patterns).

    Raises:
        HesdValueError: a pattern matches no trainable parameter, or a name is unknown.
    """
    return ParameterLayout.select(model, list(patterns), "params").names
