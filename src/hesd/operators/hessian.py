r"""The Hessian of a network's mean loss over a data set, as a linear operator.

For parameters :math:`\theta \in \mathbb{R}^P`, data batches :math:`B_1, \dots, B_m` of
sizes :math:`n_b` with :math:`N = \sum_b n_b`, and a loss ``loss_fn`` that returns the
batch mean :math:`\ell_b(\theta)`,

.. math::

    L(\theta) = \frac{1}{N} \sum_b n_b\, \ell_b(\theta), \qquad
    H v = \sum_b \frac{n_b}{N}\, \nabla^2 \ell_b(\theta)\, v ,

so unequal batches are weighted by their sample counts and :math:`H` equals the Hessian
of the loss over the concatenated data set. (For ``reduction="sum"`` losses the weight is
:math:`1/N`.)

Hessian-vector products (HVPs) use one of three methods:

* ``"graph"`` — double backward with each batch's first-order graph kept across HVPs
  (one backward pass per HVP, no forward);
* ``"double_backward"`` — recompute the forward pass and first-order graph per batch;
* ``"func"`` — :func:`torch.func.jvp` of :func:`torch.func.grad` (forward-over-reverse).

``"auto"`` (default) keeps graphs for as many batches as fit the memory budget and
recomputes the rest by double backward (faster than ``"func"`` in
``benchmarks/hvp.py``, which measures the three).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import NonDeterministicError, NonFiniteLossError
from ._base import LinearOperator
from ._batchnorm import affine_eval_batchnorm, has_running_stat_batchnorm
from ._data import as_reiterable, batch_size, call_model, split_batch, to_device

__all__ = ["HessianOperator", "exact_hessian"]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_METHODS = ("auto", "graph", "double_backward", "func")
_EVAL_BATCHNORM = ("affine", "native")
_TUNE_MIN_SECONDS = 0.05  # blocks faster than this by the batched backward keep it (see _choose_block_method)
_TUNE_COLUMNS = 8  # block width tried on the CPU (see _choose_batch_columns)
_TUNE_COLUMNS_MAX_SECONDS = 0.005  # single products slower than this keep one column per pass on the CPU
_TUNE_COLUMNS_GAIN = 0.8  # blocks are kept only when they cost at most this fraction per product


@contextmanager
def model_state(model: nn.Module, mode: str):
    """Put ``model`` in ``mode`` ("eval" or "train") and restore it afterwards.

    In train mode every buffer (BatchNorm running statistics, ``num_batches_tracked``)
    is snapshotted and restored, so taking Hessians never changes the model. Inside,
    ``scaled_dot_product_attention`` uses its math backend: the fused flash and
    memory-efficient kernels have no second derivative (``aten::_scaled_dot_product_
    flash_attention_for_cpu_backward`` is not differentiable in torch 2.13).
    """
    flags = [(m, m.training) for m in model.modules()]
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    if mode == "train":
        saved = [(b, b.detach().clone()) for b in model.buffers()]
        model.train()
    else:
        model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        if saved:
            with torch.no_grad():
                for b, copy in saved:
                    b.copy_(copy)
        for m, flag in flags:
            m.training = flag


@contextmanager
def _float32_precision(allow_tf32: bool, device: torch.device):
    """Full float32 precision inside the block unless ``allow_tf32``: matrix products do not
    round to TensorFloat-32 or bfloat16 (``torch.set_float32_matmul_precision``, which oneDNN
    honours on the CPU too) and, on a GPU, neither do cuDNN convolutions. Settings already at
    full precision are left alone (a product of the digits MLP takes under a millisecond, and
    each setting costs microseconds); the others are restored after."""
    if allow_tf32:
        yield
        return
    matmul = torch.get_float32_matmul_precision()
    cudnn_tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    if matmul != "highest":
        torch.set_float32_matmul_precision("highest")
    if cudnn_tf32:
        torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        if cudnn_tf32:
            torch.backends.cudnn.allow_tf32 = True
        if matmul != "highest":
            torch.set_float32_matmul_precision(matmul)


def _select_params(model: nn.Module, params: Any, caller: str) -> tuple[list[str], list[torch.Tensor]]:
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                f"{caller}: the model has no trainable parameters (every parameter has requires_grad=False); "
                "unfreeze the parameters to analyse, or pass params=[...]"
            )
        return [n for n, _ in chosen], [p for _, p in chosen]
    by_name = dict(named)
    by_id = {id(p): n for n, p in named}
    if isinstance(params, dict):
        params = list(params.keys())
    names: list[str] = []
    for item in params:
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(f"{caller}: the model has no parameter named {item!r}")
            names.append(item)
        elif isinstance(item, torch.Tensor) and id(item) in by_id:
            names.append(by_id[id(item)])
        else:
            raise ValueError(f"{caller}: params must be parameter names or parameters of the model, got {item!r}")
    if not names:
        raise ValueError(f"{caller}: params selects no parameters; pass at least one name")
    if len(set(names)) != len(names):
        raise ValueError(f"{caller}: params lists a parameter twice")
    frozen = [n for n in names if not by_name[n].requires_grad]
    if frozen:
        raise ValueError(f"{caller}: params includes frozen parameters {frozen}; set requires_grad=True first")
    return names, [by_name[n] for n in names]


def _default_budget(device: torch.device) -> int:
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
def _count_saved_bytes(counter: list[int]):
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


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return 0


class HessianOperator(LinearOperator):
    r"""Hessian of the mean training loss of ``model`` over ``data``, as a symmetric linear operator.

    .. math::  H = \nabla^2_\theta\, \frac{1}{N}\sum_{(x, y)} \ell(f_\theta(x), y)

    Args:
        model: any ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean scalar loss
            (``reduction="sum"`` losses are detected via their ``reduction`` attribute).
        data: a ``DataLoader``, any re-iterable of ``(inputs, targets)`` batches, a one-shot
            iterator (materialised once), or one ``(inputs, targets)`` batch. Inputs may be a
            tensor, a tuple (passed positionally) or a dict (passed as keywords).
        params: parameter names (or parameters) to differentiate with respect to, for layer
            or block analysis; default: all with ``requires_grad``.
        model_mode: ``"eval"`` (default: BatchNorm running statistics, dropout off) or
            ``"train"`` (BatchNorm batch statistics, as in several papers; running statistics
            are restored exactly; dropout is refused).
        check_deterministic: on first use, evaluate loss and gradient twice and raise
            :class:`hesd.errors.NonDeterministicError` if they differ.
        hvp_method: ``"auto"``, ``"graph"``, ``"double_backward"`` or ``"func"`` (module docs).
        memory_budget: bytes of first-order graphs ``"auto"`` may keep; default half the free
            GPU memory or a quarter of free RAM.
        process_group: a ``torch.distributed`` process group (or ``True`` for the default
            group). Each rank passes its own shard of the data (shards may differ in size,
            one may be empty); products, loss and gradient are all-reduced with sample-count
            weights, so every rank gets the Hessian of the whole data set. An error while
            preparing on any rank (non-finite loss, bad batch) is raised on every rank as
            :class:`hesd.distributed.DistributedError` naming that rank. See :mod:`hesd.distributed`.
        distributed: shorthand for ``process_group=True`` (the default group).
        autocast_dtype: run the forward pass under ``torch.autocast`` in this dtype (e.g.
            ``torch.bfloat16`` on a GPU) while parameters, products and the Lanczos
            recurrence stay in the parameters' dtype. Faster, less exact: ``benchmarks``
            and the tests measure the error against float64.
        allow_tf32: let float32 convolutions and matrix products use TensorFloat-32 on
            Ampere and newer GPUs during products (faster, about 1e-3 relative error). Off by
            default: cuDNN enables TF32 for convolutions unless told otherwise, and on an H100
            it put every tool's top-5 eigenvalues of a trained ResNet-20 about 3.5e-3 from the
            float64 values (``benchmarks/results/h100``). hesd turns it off inside its products
            and restores the user's settings after.
        batch_columns: when several vectors are multiplied at once (``H @ V`` with ``V`` of
            shape ``(P, k)``: Hutchinson/Hutch++ probes, SLQ probes run in lockstep), push up
            to this many columns through one batched backward pass
            (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap`` over the
            vector) instead of one pass per column. ``None`` (default) chooses by device:
            8 on a GPU, where one vector leaves the chip mostly idle. On the CPU it starts at 1
            and the first products of several columns decide (:meth:`_choose_batch_columns`):
            when one product takes under 5 ms, blocks of 8 are timed against single columns
            and kept if they are at least 20 % cheaper per product (``column_timings`` holds
            the times); every trial product is a real one. ``benchmarks/hvp.py`` and
            ``benchmarks/columns.py`` measured blocks of 8 2× faster per product for the digits
            MLP over 6 batches, no faster for it over one batch, and 1.4–4.4× slower for
            ResNet-20. Results equal the column-by-column products to rounding (tested).
        eval_batchnorm: how BatchNorm layers with running statistics (``model_mode="eval"``)
            enter the products. ``"affine"`` (default) evaluates each as the per-channel affine
            map :math:`y = x\,s + b` it is (:math:`s = \gamma/\sqrt{\sigma^2+\epsilon}`,
            :math:`b = \beta - \mu s`), whose second derivative is one product rule; PyTorch's
            own double backward of ``batch_norm`` is the general formula (a layer's product
            1.5–2.1× slower; about 8 % of a whole ResNet-20 product on the CPU,
            ``benchmarks/batchnorm.py``). Same function, same Hessian to rounding (tested in
            float64 against ``"native"``, which keeps PyTorch's kernel). The model is not
            modified: calls of :func:`torch.nn.functional.batch_norm` are intercepted during
            hesd's forward passes only. See :mod:`hesd.operators._batchnorm`.

    Attributes:
        shape: ``(P, P)`` with ``P`` the number of selected parameters' entries.
        dtype, device: those of the parameters.
        num_matvecs: HVPs performed (one per column).
        param_names: the names of the parameters, in the order of the flattened vector.
        block_method: how blocks of columns are multiplied. With ``hvp_method="auto"`` it is
            ``None`` until the first block product, which times the kept-graph batched
            backward (``"graph"``) against ``vmap`` of forward-over-reverse (``"func"``) and
            keeps the faster (``block_timings`` holds the two times); in ``model_mode="train"``
            it stays on the graph path.
        default_lockstep: how many SLQ probes :func:`hesd.slq` runs together by default:
            ``batch_columns`` as given, or 8 on a GPU and 1 on the CPU. Fixed at construction,
            so that SLQ results never depend on which products ran before (the CPU's block
            choice, below, does not change it).
        column_timings: on the CPU with ``batch_columns=None``, seconds per product measured
            by the first products of several columns: ``"single"`` once 8 single columns were
            timed, and ``"block"`` once blocks were tried (empty until then). While blocks are
            being tried ``batch_columns`` is 8; the decision sets it for good.

    Notes:
        Products are taken at the parameter values of the moment: if parameters change
        in place (an optimiser step) the kept graphs are rebuilt on the next product.

    Example:
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
        loss_fn: Callable[[Any, Any], torch.Tensor],
        data: Any,
        *,
        params: Sequence[str] | Sequence[torch.Tensor] | None = None,
        model_mode: str = "eval",
        check_deterministic: bool = True,
        hvp_method: str = "auto",
        memory_budget: int | None = None,
        process_group: Any = None,
        distributed: bool = False,
        autocast_dtype: torch.dtype | None = None,
        batch_columns: int | None = None,
        allow_tf32: bool = False,
        eval_batchnorm: str = "affine",
    ) -> None:
        caller = "HessianOperator"
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # A model being trained with DDP is analysed locally: DDP's gradient hooks are not wanted here.
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"{caller}: loss_fn must be callable, got {type(loss_fn).__name__}")
        if model_mode not in ("eval", "train"):
            raise ValueError(f"{caller}: model_mode must be 'eval' or 'train', got {model_mode!r}")
        if hvp_method not in _METHODS:
            raise ValueError(f"{caller}: hvp_method must be one of {_METHODS}, got {hvp_method!r}")
        if eval_batchnorm not in _EVAL_BATCHNORM:
            raise ValueError(f"{caller}: eval_batchnorm must be one of {_EVAL_BATCHNORM}, got {eval_batchnorm!r}")
        if batch_columns is not None and (
            isinstance(batch_columns, bool) or not isinstance(batch_columns, int) or batch_columns < 1
        ):
            raise ValueError(f"{caller}: batch_columns must be a positive integer or None, got {batch_columns!r}")
        if memory_budget is not None and memory_budget < 0:
            raise ValueError(f"{caller}: memory_budget must be a non-negative number of bytes")
        if model_mode == "train" and hvp_method == "func":
            raise ValueError(
                f"{caller}: hvp_method='func' cannot run in model_mode='train' (BatchNorm updates its buffers in "
                "place, which torch.func cannot trace); use hvp_method='auto' or 'double_backward'"
            )
        if model_mode == "train":
            drop = [n for n, m in model.named_modules() if isinstance(m, _DROPOUT) and m.p > 0]
            if drop:
                raise ValueError(
                    f"{caller}: model_mode='train' with active dropout {drop} makes Hessian-vector products random; "
                    "use model_mode='eval' or set the dropout probability to 0"
                )
        self.model = model
        self.loss_fn = loss_fn
        self.model_mode = model_mode
        self.check_deterministic = check_deterministic
        self.hvp_method = hvp_method
        self.memory_budget = memory_budget
        self.param_names, self._params = _select_params(model, params, caller)
        dtypes = {p.dtype for p in self._params}
        devices = {p.device for p in self._params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"{caller}: the selected parameters mix dtypes {sorted(map(str, dtypes))} or devices "
                f"{sorted(map(str, devices))}; convert the model with model.to(dtype, device)"
            )
        if not self._params[0].is_floating_point():
            raise TypeError(f"{caller}: parameters must be floating point, got {self._params[0].dtype}")
        self.dtype = self._params[0].dtype
        self.device = self._params[0].device
        self._shapes = [p.shape for p in self._params]
        self._numels = [p.numel() for p in self._params]
        P = sum(self._numels)
        self.shape = (P, P)
        self._data = as_reiterable(data, caller)
        from ..distributed import resolve_group

        self.process_group = resolve_group(True if distributed and process_group is None else process_group)
        self.autocast_dtype = autocast_dtype
        self.allow_tf32 = bool(allow_tf32)
        self.eval_batchnorm = eval_batchnorm
        self._affine_bn = eval_batchnorm == "affine" and model_mode == "eval" and has_running_stat_batchnorm(model)
        self.batch_columns = batch_columns if batch_columns is not None else (8 if self.device.type == "cuda" else 1)
        # Under torch.distributed each rank decides on its own timings; the block width changes
        # only the layout of the local result, which _allreduce makes contiguous.
        self._tune_columns = batch_columns is None and self.device.type != "cuda"
        self._column_trial: dict[str, Any] = {"single": [], "blocks": 0, "block": []}
        self.default_lockstep = self.batch_columns
        self.column_timings: dict[str, float] = {}
        reduction = getattr(loss_fn, "reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{caller}: loss_fn has reduction={reduction!r}; use 'mean' (or 'sum')")
        self._sum_reduction = reduction == "sum"
        self.num_matvecs = 0
        self.block_method: str | None = None if hvp_method == "auto" else hvp_method
        self.block_timings: dict[str, float] = {}
        self._prepared = False

    # ------------------------------------------------------------------ helpers
    def _unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        return [c.view(s) for c, s in zip(torch.split(v, self._numels), self._shapes, strict=True)]

    def _flatten(self, tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
        return torch.cat(
            [
                (t if t is not None else torch.zeros(s, dtype=self.dtype, device=self.device)).reshape(-1)
                for t, s in zip(tensors, self._shapes, strict=True)
            ]
        )

    def _batches(self) -> Iterable[tuple[Any, Any, int]]:
        for batch in self._data:
            inputs, targets = split_batch(batch, "HessianOperator")
            n = batch_size(inputs, targets)
            if n == 0:
                continue
            yield to_device(inputs, self.device, self.dtype), to_device(targets, self.device, self.dtype), n

    def _loss(self, inputs: Any, targets: Any, index: int) -> torch.Tensor:
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                out = call_model(self.model, inputs)
            out = out.to(self.dtype) if isinstance(out, torch.Tensor) else out
        else:
            out = call_model(self.model, inputs)
        loss = self.loss_fn(out, targets)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"HessianOperator: loss_fn must return a scalar tensor, got {shape}; use a loss with reduction='mean'"
            )
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"HessianOperator: the loss is {loss.item()} on batch {index}; the checkpoint has diverged or the "
                "data holds NaN/inf. Check the checkpoint and the inputs; curvature is undefined there"
            )
        return loss.reshape(())

    def _grad(self, loss: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(
            loss, self._params, create_graph=create_graph, allow_unused=True, materialize_grads=True
        )

    def _weight(self, n: int) -> float:
        return (1.0 if self._sum_reduction else float(n)) / self._num_samples

    def _allreduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks (in place; returned). ``t`` is made contiguous first: a block
        product's result is the transpose of a ``(k, P)`` tensor, and gloo sums the storage as it
        lies, so a rank holding that layout beside one holding a contiguous ``(P, k)`` (ranks may
        choose different block widths) summed unrelated entries without an error (a CI run saw a
        3-rank trace of 3.24 for 4.46; ``tests/test_distributed.py`` pins mixed widths)."""
        if self.process_group is not None:
            t = t.contiguous()
            torch.distributed.all_reduce(t, group=self.process_group)
        return t

    @contextmanager
    def _forward_state(self):
        """The state every forward pass of hesd's runs in: the model in ``model_mode`` (restored
        after) and, with ``eval_batchnorm="affine"``, BatchNorm as its affine map."""
        with model_state(self.model, self.model_mode), affine_eval_batchnorm(self._affine_bn):
            yield

    def _versions(self) -> list[int]:
        return [p._version for p in self._params]

    # ------------------------------------------------------------------ preparation
    def prepare(self) -> None:
        """Count samples, evaluate loss and gradient, keep first-order graphs, check determinism.

        Runs automatically before the first product; call it to pay the cost up front.
        Raises the documented errors for empty data, non-scalar or non-finite loss, and
        non-deterministic models or data.
        """
        budget = self.memory_budget if self.memory_budget is not None else _default_budget(self.device)
        keep_graphs = self.hvp_method in ("auto", "graph")
        unlimited = self.hvp_method == "graph"
        self._cache: list[tuple[int, torch.Tensor | None]] = []
        self._stored: list[tuple[Any, Any, int]] = []
        self._stream = False
        self.graph_bytes = 0
        with self._forward_state(), _float32_precision(self.allow_tf32, self.device):
            error: BaseException | None = None
            try:
                losses, grads, used = self._local_pass(budget, keep_graphs, unlimited)
                if not losses and self.process_group is None:
                    raise ValueError("HessianOperator: data yielded no samples; pass a non-empty DataLoader or batch")
            except Exception as exc:
                error, losses, grads, used = exc, [], [], 0
            if self.process_group is not None:
                from ..distributed import agree

                agree(self.process_group, error, "HessianOperator.prepare")
            elif error is not None:
                raise error
            if self._stream:
                # Batches do not fit: keep no partial cache (a reshuffling loader would mix samples).
                self._cache = []
                used = 0
            self.graph_bytes = used
            n_local = sum(n for n, _ in losses)
            count = torch.tensor([float(n_local)], dtype=torch.float64, device=self.device)
            self._num_samples = float(self._allreduce(count).item())
            if self._num_samples == 0:
                raise ValueError("HessianOperator: no rank holds any sample; pass non-empty data shards")
            self._loss_value, self._gradient = self._reduce_loss_grad(losses, grads)
            if self.check_deterministic:
                self._check_determinism()
        self._prepared = True
        self._prepared_versions = self._versions()

    def _local_pass(self, budget: int, keep_graphs: bool, unlimited: bool):
        """One pass over this rank's data: losses, gradients, and the kept first-order graphs."""
        used = 0
        losses: list[tuple[int, torch.Tensor]] = []
        grads: list[tuple[int, torch.Tensor]] = []
        for index, (inputs, targets, n) in enumerate(self._batches()):
            counter = [0]
            want_graph = keep_graphs and not self._stream and (unlimited or used < budget)
            with torch.enable_grad(), _count_saved_bytes(counter):
                loss = self._loss(inputs, targets, index)
                g = self._grad(loss, create_graph=want_graph)
            flat = None
            if want_graph and (unlimited or used + counter[0] <= budget):
                with torch.enable_grad():
                    flat = self._flat_graph(g)
                self._cache.append((n, flat))
                used += counter[0]
            elif keep_graphs and not self._stream:
                used = budget  # no more graphs; remember the batch itself
                self._stored.append((inputs, targets, n))
                if sum(_nbytes(b) for b in self._stored) > budget:
                    self._stream = True
                    self._stored = []
            losses.append((n, loss.detach()))
            grads.append((n, flat.detach() if flat is not None else self._flatten([t.detach() for t in g])))
        return losses, grads, used

    def _reduce_loss_grad(self, losses, grads) -> tuple[float, torch.Tensor]:
        loss = sum(self._weight(n) * float(v) for n, v in losses)
        grad = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for n, g in grads:
            grad += self._weight(n) * g
        loss_t = self._allreduce(torch.as_tensor(loss, dtype=torch.float64, device=self.device).reshape(1))
        return float(loss_t.item()), self._allreduce(grad)

    def _check_determinism(self) -> None:
        losses, grads = [], []
        for index, (inputs, targets, n) in enumerate(self._batches()):
            with torch.enable_grad():
                loss = self._loss(inputs, targets, index)
                g = self._grad(loss, create_graph=False)
            losses.append((n, loss.detach()))
            grads.append((n, self._flatten(g)))
        loss2, grad2 = self._reduce_loss_grad(losses, grads)
        tol = 1e-9 if self.dtype == torch.float64 else 1e-4
        scale = float(self._gradient.abs().max()) + 1e-30
        gdiff = float((grad2 - self._gradient).abs().max()) / scale
        ldiff = abs(loss2 - self._loss_value) / (abs(self._loss_value) + 1e-30)
        if gdiff > tol or ldiff > tol or not math.isfinite(gdiff):
            raise NonDeterministicError(
                "HessianOperator: two passes over the same data gave different losses or gradients "
                f"(relative difference {max(gdiff, ldiff):.2e}). Hessian-vector products would be random. "
                "Common causes: dropout or BatchNorm in train mode (use model_mode='eval'), a DataLoader "
                "with random augmentation or drop_last with shuffling (use a fixed, un-augmented loader). "
                "Pass check_deterministic=False to skip this check."
            )

    def _ensure_prepared(self) -> None:
        if not self._prepared or self._versions() != self._prepared_versions:
            self.prepare()

    # ------------------------------------------------------------------ public extras
    @property
    def num_samples(self) -> int:
        """Number of samples in the data (all ranks together)."""
        self._ensure_prepared()
        return int(self._num_samples)

    def loss(self) -> float:
        """Mean loss over the data at the current parameters."""
        self._ensure_prepared()
        return self._loss_value

    def gradient(self) -> torch.Tensor:
        """Flattened gradient of the mean loss over the data."""
        self._ensure_prepared()
        return self._gradient.clone()

    def start_direction(self) -> torch.Tensor | None:
        """The loss gradient: near a trained network's parameters it lies mostly in the span of
        the top Hessian eigenvectors (Gur-Ari, Roberts and Dyer, arXiv 1812.04754), so mixed into
        a random start vector it speeds up Lanczos for the largest eigenvalues
        (:func:`hesd.eigenvalues`). ``None`` when the gradient is zero or not finite."""
        g = self.gradient()
        norm = float(torch.linalg.vector_norm(g))
        return g if math.isfinite(norm) and norm > 0 else None

    def params_vector(self) -> torch.Tensor:
        """The selected parameters, flattened in operator order."""
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    # ------------------------------------------------------------------ products
    def _weighted_blocks(self, V: torch.Tensor, w: float) -> Iterable[tuple[slice, torch.Tensor]]:
        """Column slices of at most ``batch_columns`` columns and ``w · V[:, cols]`` (no copy when
        ``w`` is 1, as for a single batch)."""
        b = self.batch_columns
        for start in range(0, V.shape[1], b):
            cols = slice(start, min(start + b, V.shape[1]))
            yield cols, (V[:, cols] if w == 1.0 else V[:, cols] * w)

    def _unflatten_columns(self, V: torch.Tensor) -> list[torch.Tensor]:
        """``(P, b)`` columns as per-parameter tensors of shape ``(b, *param.shape)``."""
        Vt = V.T
        return [c.reshape(V.shape[1], *s) for c, s in zip(torch.split(Vt, self._numels, dim=1), self._shapes,
                                                           strict=True)]  # fmt: skip

    def _flatten_columns(self, tensors: Iterable[torch.Tensor | None], k: int) -> torch.Tensor:
        """Per-parameter ``(k, *shape)`` results (``None``: unused parameter) as ``(P, k)``."""
        return torch.cat(
            [
                (t if t is not None else torch.zeros(k, n, dtype=self.dtype, device=self.device)).reshape(k, -1)
                for t, n in zip(tensors, self._numels, strict=True)
            ],
            dim=1,
        ).T

    @staticmethod
    def _accumulate(out: torch.Tensor | None, V: torch.Tensor, cols: slice, r: torch.Tensor) -> torch.Tensor:
        """Add the block result ``r`` to columns ``cols`` of ``out``; the first result that spans
        every column becomes ``out`` itself (no zero-filled buffer, no extra addition)."""
        if out is None:
            if r.shape[1] == V.shape[1]:
                return r
            out = torch.zeros_like(V)
        out[:, cols] += r
        return out

    @staticmethod
    def _flat_graph(grads: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """One batch's first-order gradient as a single flat tensor that keeps its graph, or ``None``
        when the gradient does not depend on the parameters (that batch's Hessian is zero).

        One flat output lets a product pass the vector to ``torch.autograd.grad`` whole. Split
        into per-parameter views in Python instead, a product of the digits MLP cost about 45 µs
        (6 %) more; the concatenation's backward splits it in C++. Its graph adds one
        ``CatBackward`` node and the flat tensor (``P`` entries) per kept batch."""
        if not any(g.requires_grad for g in grads):
            return None
        return torch.cat([g.reshape(-1) for g in grads])

    def _hvp_graph(self, flat: torch.Tensor | None, V: torch.Tensor, w: float, out: torch.Tensor | None):
        """``out + w · H_b V`` through one batch's kept first-order graph ``flat`` (:meth:`_flat_graph`)."""
        if flat is None:
            return out
        for cols, block in self._weighted_blocks(V, w):
            if block.shape[1] == 1:
                hv = torch.autograd.grad(flat, self._params, grad_outputs=block[:, 0], retain_graph=True,
                                         allow_unused=True, materialize_grads=True)  # fmt: skip
                out = self._accumulate(out, V, cols, self._flatten(hv)[:, None])
                continue
            hv = torch.autograd.grad(flat, self._params, grad_outputs=block.T, retain_graph=True,
                                     allow_unused=True, is_grads_batched=True)  # fmt: skip
            out = self._accumulate(out, V, cols, self._flatten_columns(hv, block.shape[1]))
        return out

    def _hvp_func(self, inputs: Any, targets: Any, V: torch.Tensor, w: float, out: torch.Tensor | None):
        """``out + w · H_b V`` by forward-over-reverse on one batch (``vmap`` over columns)."""
        primals = {n: p.detach() for n, p in zip(self.param_names, self._params, strict=True)}

        def loss_of(pd: dict[str, torch.Tensor]) -> torch.Tensor:
            if isinstance(inputs, dict):
                output = functional_call(self.model, pd, (), inputs)
            elif isinstance(inputs, (tuple, list)):
                output = functional_call(self.model, pd, tuple(inputs))
            else:
                output = functional_call(self.model, pd, (inputs,))
            return self.loss_fn(output, targets)

        grad_fn = torch.func.grad(loss_of)

        def hvp(tangents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return torch.func.jvp(grad_fn, (primals,), (tangents,))[1]

        for cols, block in self._weighted_blocks(V, w):
            if block.shape[1] == 1:
                hv = hvp(dict(zip(self.param_names, self._unflatten(block[:, 0]), strict=True)))
                out = self._accumulate(out, V, cols, self._flatten([hv[n] for n in self.param_names])[:, None])
                continue
            hv = torch.func.vmap(hvp)(dict(zip(self.param_names, self._unflatten_columns(block), strict=True)))
            out = self._accumulate(out, V, cols, self._flatten_columns([hv[n] for n in self.param_names],
                                                                       block.shape[1]))  # fmt: skip
        return out

    def _recompute(
        self, inputs: Any, targets: Any, n: int, V: torch.Tensor, out: torch.Tensor | None, index: int
    ) -> torch.Tensor | None:
        w = self._weight(n)
        # benchmarks/hvp.py (2 CPU threads): recomputed double backward 2.2x a gradient on the digits MLP
        # and 2.6x on ResNet-20, against 4.6x and 3.6x for torch.func forward-over-reverse.
        with torch.enable_grad():
            g = self._grad(self._loss(inputs, targets, index), create_graph=True)
            return self._hvp_graph(self._flat_graph(g), V, w, out)

    def _matmat_graph(self, V: torch.Tensor) -> torch.Tensor:
        out = None
        with torch.enable_grad():
            for n, g in self._cache:
                out = self._hvp_graph(g, V, self._weight(n), out)
        if self._stream or not self._cache or self._stored:
            with self._forward_state():
                if self._stream or (not self._cache and not self._stored):
                    for index, (inputs, targets, n) in enumerate(self._batches()):
                        out = self._recompute(inputs, targets, n, V, out, index)
                else:
                    for index, (inputs, targets, n) in enumerate(self._stored):
                        out = self._recompute(inputs, targets, n, V, out, len(self._cache) + index)
        return out if out is not None else torch.zeros_like(V)

    def _matmat_func(self, V: torch.Tensor) -> torch.Tensor:
        """Every batch recomputed with ``vmap`` of forward-over-reverse (no kept graph)."""
        out = None
        with self._forward_state(), torch.enable_grad():
            for inputs, targets, n in self._batches():
                out = self._hvp_func(inputs, targets, V, self._weight(n), out)
        return out if out is not None else torch.zeros_like(V)

    def _choose_block_method(self, V: torch.Tensor) -> torch.Tensor:
        """``"auto"`` with a block of columns: time the kept-graph batched backward against
        ``vmap`` of forward-over-reverse on this block, keep the faster (``block_method``).

        Measured on an H100 (``benchmarks/hvp.py``): for ResNet-20 the ``vmap`` product is
        1.9x faster per vector than the batched backward, for the digits MLP 2.5x slower, so
        neither is a safe fixed choice. Each method runs once to warm up (``vmap``'s first call
        pays for tracing and kernel selection), then twice timed, alternating; the minimum
        counts. Costs six block products once; returns the first.

        A block that the batched backward multiplies in under ``_TUNE_MIN_SECONDS`` (50 ms)
        keeps it without trying ``vmap``: the cold start with ``vmap`` costs seconds on an H100
        (``benchmarks/profile_hesd.py``: Hutch++ on ResNet-20 took 7.6 s cold and 1.8 s warm
        in one process), which only pays back when each block is expensive.
        """
        out, first = self._timed(self._matmat_graph, V)
        if first < _TUNE_MIN_SECONDS:
            self.block_method, self.block_timings = "graph", {"graph": first}
            return out
        self._timed(self._matmat_func, V)
        times: dict[str, list[float]] = {"graph": [], "func": []}
        for _ in range(2):
            times["graph"].append(self._timed(self._matmat_graph, V)[1])
            times["func"].append(self._timed(self._matmat_func, V)[1])
        t_graph, t_func = min(times["graph"]), min(times["func"])
        self.block_method = "func" if t_func < t_graph else "graph"
        self.block_timings = {"graph": t_graph, "func": t_func}
        return out

    def _timed(self, fn: Callable[[torch.Tensor], torch.Tensor], V: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``fn(V)`` and its wall time in seconds (the GPU synchronised before and after)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        result = fn(V)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return result, time.perf_counter() - t

    def _choose_batch_columns(self, V: torch.Tensor) -> torch.Tensor:
        """CPU, ``batch_columns=None``: decide, over the first products of several columns,
        whether blocks of :data:`_TUNE_COLUMNS` (8) columns beat one column per pass, and keep
        the choice. Every trial product multiplies a real column of ``V``: nothing is thrown away.

        The trial runs across calls, on the columns in the order they come:

        1. The first 8 columns are multiplied one at a time and timed (the minimum counts). If a
           product takes more than ``_TUNE_COLUMNS_MAX_SECONDS`` (5 ms), one column per pass is
           kept: on the CPU blocks lost for every expensive model measured (ResNet-20: 1.4–1.6×
           slower per product in ``benchmarks/hvp.py``, 4.4× slower end to end in
           ``benchmarks/columns.py``), and trying them would cost seconds. On a slow day the
           digits MLP over 6 batches, whose blocks halve the cost, took 3.3–6.7 ms a product and
           skipped the trial on some runs; a higher limit is not measured on convolutional
           models, so it stays.
        2. Otherwise the next columns go in blocks of up to 8 (fewer at the end of a call).
           The first block warms up the batched backward (and ``auto`` chooses its block method
           there); the next two are timed, per column. A block narrower than 8 amortises less,
           so its timing errs towards one column per pass; but calls that never hold 8 columns
           (``slq(..., lockstep=4)``) still get a decision.
        3. Blocks are kept when the faster timed block costs at most ``_TUNE_COLUMNS_GAIN``
           (0.8) of a single product per column: the gains measured were about 2× (digits MLP
           over 6 batches), and a marginal difference is noise at these sub-millisecond times
           (noise only slows a block down, so a single timing errs towards one column).

        ``hesd.trace`` pushes its probes through in calls of at most 8 columns, so the trial
        takes its first 4 calls (Hutch++'s sketch of 20 columns: 8 single, a warm-up block of 8,
        a timed block of 4; then a timed block of 8). Until the fifth session's end the trial
        decided within one call and repeated columns when the call had too few: for the digits
        MLP that threw away 16 column products of a 60-product Hutch++
        (``benchmarks/results/cpu/columns_trial_calls.txt``).
        """
        trial = self._column_trial
        n = V.shape[1]
        cols: list[torch.Tensor] = []
        j = 0
        while self._tune_columns and j < n:
            if len(trial["single"]) < _TUNE_COLUMNS:
                col, seconds = self._timed(self._product, V[:, j : j + 1])
                trial["single"].append(seconds)
                cols.append(col)
                j += 1
                if len(trial["single"]) == _TUNE_COLUMNS:
                    self.column_timings = {"single": min(trial["single"])}
                    if self.column_timings["single"] > _TUNE_COLUMNS_MAX_SECONDS:
                        self._tune_columns = False  # expensive products: one column per pass
                    else:
                        self.batch_columns = _TUNE_COLUMNS  # blocks from here on, while they are tried
                continue
            block = V[:, j : j + _TUNE_COLUMNS]
            out, seconds = self._timed(self._product, block)
            cols.append(out)
            j += block.shape[1]
            if block.shape[1] == 1:
                continue  # a lone column at the end of a call is no block
            trial["blocks"] += 1
            if trial["blocks"] > 1:  # the first block warms up
                trial["block"].append(seconds / block.shape[1])
            if len(trial["block"]) == 2:
                self.column_timings["block"] = min(trial["block"])
                if self.column_timings["block"] > _TUNE_COLUMNS_GAIN * self.column_timings["single"]:
                    self.batch_columns = 1
                self._tune_columns = False
        if j < n:
            cols.append(self._product(V[:, j:]))
        return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)

    def _product(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` on this rank by the configured method (no count, no all-reduce)."""
        block = V.shape[1] > 1 and self.batch_columns > 1
        if block and self.hvp_method == "auto" and self.model_mode == "eval" and self.block_method is None:
            return self._choose_block_method(V)
        if block and self.hvp_method == "auto" and self.block_method == "func":
            return self._matmat_func(V)
        if self.hvp_method == "func":
            return self._matmat_func(V)
        return self._matmat_graph(V)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self._ensure_prepared()
        with _float32_precision(self.allow_tf32, self.device):
            if self._tune_columns and V.shape[1] > 1:
                out = self._choose_batch_columns(V)
            else:
                out = self._product(V)
        self.num_matvecs += V.shape[1]
        return self._allreduce(out)


def exact_hessian(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    data: Any,
    *,
    params: Sequence[str] | None = None,
    model_mode: str = "eval",
    chunk: int = 64,
) -> torch.Tensor:
    r"""The dense ``P × P`` Hessian of the mean loss, one block of columns at a time.

    Computed as :math:`H = H I` with :class:`HessianOperator` (double backward, PyTorch's own
    BatchNorm kernel: ``eval_batchnorm="native"``, so that it checks the default affine form
    independently), so it is exact to rounding. Memory is :math:`P^2` entries: meant for small models and tests.

    Args:
        model, loss_fn, data, params, model_mode: as for :class:`HessianOperator`.
        chunk: number of identity columns per pass over the data.

    Example:
        >>> import torch, hesd
        >>> model = torch.nn.Linear(2, 1).double()
        >>> X, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
        >>> H = hesd.exact_hessian(model, torch.nn.functional.mse_loss, (X, y))
        >>> H.shape, bool(torch.allclose(H, H.T))
        (torch.Size([3, 3]), True)
    """
    op = HessianOperator(
        model,
        loss_fn,
        data,
        params=params,
        model_mode=model_mode,
        check_deterministic=False,
        hvp_method="double_backward",
        eval_batchnorm="native",
    )
    P = op.shape[0]
    H = torch.empty(P, P, dtype=op.dtype, device=op.device)
    eye = torch.eye(P, dtype=op.dtype, device=op.device)
    for start in range(0, P, chunk):
        H[:, start : start + chunk] = op @ eye[:, start : start + chunk]
    return H
