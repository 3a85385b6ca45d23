r"""The Hessian of a network's loss over a data set, as a linear operator.

For parameters :math:`\theta \in \mathbb{R}^P` and data batches :math:`B_1, \dots, B_m` with
:math:`n_b` loss-bearing items each (:math:`N = \sum_b n_b`),

.. math::

    L(\theta) = \sum_b w_b\, \ell_b(\theta), \qquad
    H v = \sum_b w_b\, \nabla^2 \ell_b(\theta)\, v , \qquad w_b = n_b / N

for batch-mean losses :math:`\ell_b` (:math:`1/N` for summed ones), so :math:`H` is the
Hessian of the loss over the concatenated data set whatever the batch sizes.

:class:`HessianOperator` composes the pieces of :mod:`hesd.operators`, one concern each:
:mod:`~hesd.operators.layout` (which parameters, flat vectors),
:mod:`~hesd.operators.loss` (how a batch becomes a loss and its weight),
:mod:`~hesd.operators.forward` (model mode, BatchNorm form, attention kernel, precision),
:mod:`~hesd.operators.first_order` (loss, gradient, kept graphs),
:mod:`~hesd.operators.products` (the product methods),
:mod:`~hesd.operators.tuning` (block width and block method, chosen from timings),
:mod:`~hesd.operators.support` (what PyTorch cannot differentiate), and
:mod:`hesd.collectives` (the all-reduce under ``torch.distributed``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..allocator import release_when_low
from ..checks import check_choice, check_type
from ..collectives import all_reduce_sum, resolve_group
from ..errors import HesdError, HesdValueError
from .blocks import BlockChoices, BlockScheduler
from .chunks import check_rows_independent
from .data import as_reiterable
from .finite_difference import check_model
from .first_order import FirstOrderState, Objective, default_budget, first_order_pass
from .forward import ForwardContext
from .layout import ParameterLayout
from .linear import LinearOperator
from .loss import LossContract
from .model_loss import loss_contract
from .products import PASSES
from .support import batching_note, derivative_gap, fall_back, unsupported
from .tuning import BlockMethodChoice, BlockWidthTrial

__all__ = ["HessianOperator"]

logger = logging.getLogger("hesd")

_METHODS = ("auto", "graph", "double_backward", "func", "finite_difference")


class HessianOperator(BlockChoices, LinearOperator):
    r"""Hessian of the mean training loss of ``model`` over ``data``, as a symmetric linear operator.

    .. math::  H = \nabla^2_\theta\, \frac{1}{N}\sum_{(x, y)} \ell(f_\theta(x), y)

    Args:
        model: any ``nn.Module`` (a ``DistributedDataParallel`` wrapper is unwrapped).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean scalar loss
            (``reduction="sum"`` losses are detected via their ``reduction`` attribute);
            ``None``: the loss the model computes itself (Hugging Face models with ``labels``
            in dict batches), weighted by loss-bearing tokens (:class:`hesd.ModelLoss`);
            :class:`hesd.BatchLoss` for ``fn(model, batch)``.
        data: a ``DataLoader``, any re-iterable of batches, a one-shot iterator (materialised
            once), or one ``(inputs, targets)`` batch. With a ``loss_fn`` a batch is
            ``(inputs, targets)``, inputs a tensor, a tuple (passed positionally) or a dict
            (passed as keywords); with ``loss_fn=None`` a batch is the model's arguments (a dict
            such as ``{input_ids, attention_mask, labels}``).
        params: parameter names, ``fnmatch`` patterns of names (``"layers.3.*"``) or
            parameters to differentiate with respect to, for layer or block analysis; default:
            all with ``requires_grad`` (:class:`~hesd.operators.ParameterLayout`).
        model_mode: ``"eval"`` (default: BatchNorm running statistics, dropout off) or
            ``"train"`` (BatchNorm batch statistics, as in several papers; running statistics
            are restored exactly; dropout is refused).
        check_deterministic: on first use, evaluate the loss over all the data a second time
            (forward passes only) and raise :class:`hesd.errors.NonDeterministicError` if it differs.
        hvp_method: ``"graph"`` (keep every batch's first-order graph; one backward pass per
            product), ``"double_backward"`` (recompute forward and first-order graph per batch
            and product), ``"func"`` (forward-over-reverse, :func:`torch.func.jvp` of
            :func:`torch.func.grad`), ``"finite_difference"`` (central differences of the
            gradient: no second derivative needed, about :math:`u^{2/3}` relative error,
            :mod:`~hesd.operators.finite_difference`), or ``"auto"`` (default: keep graphs for
            as many batches as fit ``memory_budget`` and recompute the rest; for blocks of several
            columns, time the batched backward against ``vmap`` of forward-over-reverse once and
            keep the faster, :class:`~hesd.operators.tuning.BlockMethodChoice`; finite differences
            only when neither exact method can differentiate the model, with a warning).
        fd_step: the relative step :math:`r` of finite-difference products (default
            :math:`\tfrac34 u^{1/3}` of the parameters' dtype).
        max_tokens: run every pass over a batch in micro-batches of at most this many tokens
            (rows × sequence length), each weighted by its own count: the same Hessian with
            activation and logits memory bounded (:mod:`~hesd.operators.chunks`).
        memory_budget: bytes of first-order graphs ``"auto"`` may keep; default half the free
            GPU memory or a quarter of free RAM.
        host_reserve: bytes of host memory a product needs available: before a product that
            would find less (before the first, less than this plus ``memory_budget``, the graphs
            it may keep), memory that ``malloc`` keeps but no tensor uses is handed back to the
            OS (:func:`hesd.allocator.release_when_low`; glibc tuned to reuse large buffers
            otherwise lets freed, fragmented blocks grow past a memory plan). ``None``
            (default): never. :meth:`hesd.analysis.memory_plan.MemoryPlan.operator_kwargs` sets
            it to one product's transient peak.
        process_group: a ``torch.distributed`` process group (or ``True`` for the default
            group). Each rank passes its own shard of the data (shards may differ in size,
            one may be empty); products, loss and gradient are all-reduced with item-count
            weights, so every rank gets the Hessian of the whole data set. An error while
            preparing on any rank is raised on every rank as
            :class:`hesd.collectives.DistributedError` naming that rank.
        distributed: shorthand for ``process_group=True`` (the default group).
        autocast_dtype: run forward passes under ``torch.autocast`` in this dtype (e.g.
            ``torch.bfloat16`` on a GPU) while parameters, products and the Lanczos recurrence
            stay in the parameters' dtype. Faster, less exact (about 1e-2 relative, tested).
        allow_tf32: let float32 convolutions and matrix products use TensorFloat-32 during
            products (faster, about 1e-3 relative error). Off by default: hesd turns it off
            inside its products and restores the user's settings after.
        batch_columns: push up to this many columns of ``H @ V`` (``V`` of shape ``(P, k)``)
            through one batched pass instead of one pass per column. ``None`` (default): 8 on
            a GPU; on the CPU 1, and the first products of several columns decide whether
            blocks of 8 are cheaper (:class:`~hesd.operators.tuning.BlockWidthTrial`; every
            trial product is a real one). A model whose batched second derivative PyTorch
            cannot take (:data:`~hesd.operators.support.BATCHING_GAPS`) falls back to exact
            one-column products, once, with one logged note.
        eval_batchnorm: ``"affine"`` (default) evaluates BatchNorm layers with running
            statistics as the per-channel affine map they are, whose second derivative is one
            product rule; ``"native"`` keeps PyTorch's ``batch_norm`` kernel. Same Hessian to
            rounding (:mod:`hesd.operators.batchnorm`).

    Attributes:
        shape: ``(P, P)`` with ``P`` the number of selected parameters' entries.
        dtype: the parameters' dtype.
        device: the parameters' device.
        layout: the :class:`~hesd.operators.ParameterLayout` of the selected parameters.
        num_matvecs: products performed (one per column).
        default_lockstep: how many SLQ probes :func:`hesd.slq` runs together by default:
            ``batch_columns`` as given, or 8 on a GPU and 1 on the CPU; fixed at construction,
            so that SLQ results never depend on which products ran before.
        blocks: the :class:`~hesd.operators.blocks.BlockScheduler` (block width and method,
            their timings and fallbacks; the properties below read it).

    Notes:
        Products are taken at the parameter values of the moment: if parameters change
        in place (an optimiser step) the kept graphs are rebuilt on the next product.

    Examples:
        >>> import torch, hesd
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> H = hesd.HessianOperator(model, torch.nn.functional.cross_entropy, (X, y))
        >>> H.shape
        (8, 8)
        >>> v = torch.randn(8, dtype=torch.float64)
        >>> torch.allclose(H @ v, hesd.exact_hessian(model, torch.nn.functional.cross_entropy, (X, y)) @ v)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor] | LossContract | None,
        data: Any,
        *,
        params: Sequence[str] | Sequence[torch.Tensor] | None = None,
        model_mode: str = "eval",
        check_deterministic: bool = True,
        hvp_method: str = "auto",
        memory_budget: int | None = None,
        host_reserve: int | None = None,
        process_group: Any = None,
        distributed: bool = False,
        autocast_dtype: torch.dtype | None = None,
        batch_columns: int | None = None,
        allow_tf32: bool = False,
        eval_batchnorm: str = "affine",
        fd_step: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        caller = "HessianOperator"
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # analysed locally: DDP's gradient hooks are not wanted here
        check_type(model, nn.Module, "model", caller, "a torch.nn.Module")
        check_choice(hvp_method, _METHODS, "hvp_method", caller)
        if batch_columns is not None and (
            isinstance(batch_columns, bool) or not isinstance(batch_columns, int) or batch_columns < 1
        ):
            raise HesdValueError(f"{caller}: batch_columns must be a positive integer or None, got {batch_columns!r}")
        if fd_step is not None and not (isinstance(fd_step, (int, float)) and 0 < fd_step < 1):
            raise HesdValueError(f"{caller}: fd_step must be a relative step between 0 and 1, got {fd_step!r}")
        if memory_budget is not None and memory_budget < 0:
            raise HesdValueError(f"{caller}: memory_budget must be a non-negative number of bytes")
        if host_reserve is not None and (isinstance(host_reserve, bool) or not isinstance(host_reserve, (int, float))
                                         or not host_reserve >= 0):  # fmt: skip
            raise HesdValueError(f"{caller}: host_reserve must be a non-negative number of bytes, got {host_reserve!r}")
        if model_mode == "train" and hvp_method == "func":
            raise HesdValueError(
                f"{caller}: hvp_method='func' cannot run in model_mode='train' (BatchNorm updates its buffers in "
                "place, which torch.func cannot trace); use hvp_method='auto' or 'double_backward'"
            )
        check_rows_independent(model, model_mode, max_tokens, caller)
        self.model = model
        self.contract = loss_contract(loss_fn, caller)
        self.contract.bind(model)
        self.forward = ForwardContext(model, model_mode=model_mode, eval_batchnorm=eval_batchnorm,
                                      allow_tf32=allow_tf32, autocast_dtype=autocast_dtype, caller=caller)  # fmt: skip
        self.layout = ParameterLayout.select(model, params, caller)
        self.process_group = resolve_group(True if distributed and process_group is None else process_group)
        shard = as_reiterable(data, caller, allow_empty=self.process_group is not None)
        self.objective = Objective(model, self.contract, shard, self.layout, self.forward)
        self.objective.fd_step, self.objective.max_tokens = fd_step, max_tokens
        if hvp_method == "finite_difference":
            check_model(model, self.layout.dtype, caller)
        self.hvp_method = hvp_method
        self.check_deterministic = check_deterministic
        self.memory_budget = memory_budget
        self.host_reserve = host_reserve
        # Half-precision models: products accumulate in float32, vectors (the Lanczos recurrence) are float64.
        half = self.layout.dtype in (torch.bfloat16, torch.float16)
        self.dtype = torch.float64 if half else self.layout.dtype
        self.device = self.layout.device
        if half:
            logger.warning(
                "hesd: the model's parameters are %s: forward and backward passes run in %s, each product is "
                "accumulated over the batches in float32, and the Lanczos recurrence runs in float64.",
                str(self.layout.dtype).replace("torch.", ""),
                str(self.layout.dtype).replace("torch.", ""),
            )
        self.shape = (self.layout.dim, self.layout.dim)
        on_gpu = self.device.type == "cuda"
        fd = hvp_method == "finite_difference"  # columns are differenced one by one: nothing to batch or time
        width = batch_columns if batch_columns is not None else (8 if on_gpu and not fd else 1)
        self.default_lockstep = width
        # Under torch.distributed each rank decides on its own timings; the width changes only
        # the layout of the local result, which the all-reduce makes contiguous.
        self.blocks = BlockScheduler(
            single_method=hvp_method if hvp_method in ("func", "finite_difference") else "graph",
            block_method=None if hvp_method == "auto" else hvp_method,
            width=width,
            width_trial=BlockWidthTrial() if batch_columns is None and not on_gpu and not fd else None,
            method_choice=BlockMethodChoice() if hvp_method == "auto" and model_mode == "eval" else None,
            describe=lambda exc, fallback: batching_note(model, exc, fallback),
        )
        self.num_matvecs = 0
        self.state: FirstOrderState | None = None
        self._fallback: str | None = None  # "func"/"finite_difference" once PyTorch cannot take a derivative

    # ------------------------------------------------------------------ settings, as given
    @property
    def loss_fn(self) -> Any:
        """The loss function given."""
        return self.contract.loss_fn

    @property
    def model_mode(self) -> str:
        """``"eval"`` or ``"train"``."""
        return self.forward.model_mode

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The forward pass's autocast dtype, if any."""
        return self.forward.autocast_dtype

    @property
    def allow_tf32(self) -> bool:
        """Whether products may round to TensorFloat-32."""
        return self.forward.allow_tf32

    @property
    def eval_batchnorm(self) -> str:
        """``"affine"`` or ``"native"``."""
        return self.forward.eval_batchnorm

    @property
    def param_names(self) -> list[str]:
        """The selected parameters' names, in flat-vector order."""
        return self.layout.names

    @property
    def graph_bytes(self) -> int:
        """Bytes of first-order graphs kept on this rank."""
        return self._ensure_prepared().graph_bytes

    # ------------------------------------------------------------------ first-order pass
    def prepare(self) -> None:
        """Count items, evaluate loss and gradient, keep first-order graphs, check determinism.

        Runs automatically before the first product; call it to pay the cost up front.

        Raises:
            HesdValueError: the data holds no item, or the loss is not a scalar.
            NonFiniteLossError: a batch's loss is NaN or infinite.
            NonDeterministicError: two passes over the same data disagree.
        """
        budget = self.memory_budget if self.memory_budget is not None else default_budget(self.device)
        self.state = None
        gradients_only = self.hvp_method == "finite_difference"  # the model's kernels and checkpointing stay
        with self.forward.state(second_order=not gradients_only), self.forward.precision(self.device):
            self.state = first_order_pass(
                self.objective,
                budget=budget,
                keep_graphs=self.hvp_method in ("auto", "graph"),
                unlimited=self.hvp_method == "graph",
                group=self.process_group,
                check_deterministic=self.check_deterministic,
            )

    def _needs_pass(self) -> bool:
        """Whether the next use starts with a first-order pass: none yet, or the parameters changed in place."""
        return self.state is None or self.state.stale(self.layout)

    def _ensure_prepared(self) -> FirstOrderState:
        if self._needs_pass():
            self.prepare()
        assert self.state is not None
        return self.state

    @property
    def num_samples(self) -> int:
        """Number of loss-bearing items in the data (all ranks together)."""
        return int(self._ensure_prepared().total)

    def loss(self) -> float:
        """Mean loss over the data at the current parameters."""
        return self._ensure_prepared().loss

    def gradient(self) -> torch.Tensor:
        """Flattened gradient of the mean loss over the data."""
        return self._ensure_prepared().gradient.to(self.dtype, copy=True)

    def start_direction(self) -> torch.Tensor | None:
        """The loss gradient, for Krylov starts (``None`` when zero or not finite).

        Near a trained network's parameters it lies mostly in the span of the top Hessian
        eigenvectors (Gur-Ari, Roberts and Dyer, arXiv 1812.04754), so mixed into a random start
        vector it speeds up Lanczos for the largest eigenvalues (:func:`hesd.eigenvalues`).
        """
        g = self.gradient()
        norm = float(torch.linalg.vector_norm(g))
        return g if math.isfinite(norm) and norm > 0 else None

    def params_vector(self) -> torch.Tensor:
        """The selected parameters, flattened in operator order."""
        return self.layout.vector()

    # ------------------------------------------------------------------ products
    def _pass(self, method: str, V: torch.Tensor, width: int) -> torch.Tensor:
        """One pass over the data by ``method``; a missing derivative becomes a clear error.

        With ``hvp_method="auto"``, a model that PyTorch cannot double-differentiate (``ctc_loss``)
        moves to forward-over-reverse for good (eval mode), and one that neither exact method
        can differentiate to finite differences (:func:`~hesd.operators.support.fall_back`).
        """
        state = self.state
        assert state is not None
        method = self._fallback or method
        try:
            return PASSES[method](state, self.objective, V, width)
        except RuntimeError as exc:
            gap = None if isinstance(exc, HesdError) else derivative_gap(exc)
            if gap is None or (self.hvp_method == "auto" and method == "func" and self._fallback is None):
                raise  # not a derivative gap, or auto's block-method choice timing vmap: it takes the graph
            if not (self.hvp_method == "auto" and method in ("graph", "func")):
                raise unsupported([gap], self.hvp_method) from exc
            methods = ("func", "finite_difference") if gap.kind == "second" and self.model_mode == "eval" else (
                "finite_difference",)  # fmt: skip
            self._fallback, out = fall_back(
                gap, methods, lambda m: PASSES[m](state, self.objective, V, width), self.layout.dtype
            )
            return out

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self.host_reserve is not None:  # room for this product's transients (and, before the first, the graphs)
            release_when_low(self.host_reserve + ((self.memory_budget or 0) if self._needs_pass() else 0))
        self._ensure_prepared()
        mask = self.layout.defined
        if mask is not None:  # padding rows of embeddings: no gradient, so no curvature (ParameterLayout.defined)
            V = V * mask[:, None]
        with self.forward.precision(self.device):
            out = self.blocks.multiply(V.to(self.layout.dtype), self._pass).to(self.dtype)
        if mask is not None:
            out = out * mask[:, None]
        self.num_matvecs += V.shape[1]
        return all_reduce_sum(out, self.process_group)
