"""The state every forward pass of hesd runs in, entered in one place.

* the model's mode (``"eval"``: running BatchNorm statistics, dropout off; ``"train"``: batch
  statistics, with every buffer restored afterwards), the mode restored after;
* BatchNorm with running statistics evaluated as its affine map (:mod:`hesd.operators.batchnorm`);
* scaled dot-product attention on its math kernel: the fused flash and memory-efficient
  kernels have no second derivative
  (``aten::_scaled_dot_product_flash_attention_for_cpu_backward`` is not differentiable in
  torch 2.13);
* full float32 precision (no TensorFloat-32) unless allowed;
* optionally ``torch.autocast`` for the forward pass only;
* recurrent layers (``nn.RNN``/``GRU``/``LSTM``) on PyTorch's native kernels where the fused
  ones lack a derivative: on a GPU cuDNN's RNN backward runs only in training mode ("cudnn RNN
  backward can only be called in training mode"), and on the CPU oneDNN's ``mkldnn_rnn_layer``
  (a float32 LSTM) has no forward-mode derivative. The native kernels compute the same function.

* a ``transformers`` model with attention, checkpointing and cache set for products
  (:mod:`hesd.operators.hf_state`);
* a float64 model's loss in float64 where it upcasts with ``.float()``
  (:class:`~hesd.operators.rewrites.KeepFloat64`).

Forward-over-reverse products enter :meth:`ForwardContext.functional` as well; the losses whose
forward-mode derivatives PyTorch lacks are evaluated by their definitions there
(:mod:`hesd.operators.rewrites`, entered by the loss contract around the loss alone).

Examples:
    >>> import torch
    >>> from hesd.operators.forward import ForwardContext
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    >>> ctx = ForwardContext(model, model_mode="eval")
    >>> with ctx.state():
    ...     model.training
    False
    >>> model.training
    True
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..checks import check_choice
from ..errors import HesdValueError
from .batchnorm import affine_eval_batchnorm, has_running_stat_batchnorm
from .hf_state import config_dropout, hf_configs, transformer_state
from .rewrites import KeepFloat64

__all__ = ["DROPOUT_TYPES", "ForwardContext", "backend_enabled", "float32_precision", "model_state"]

logger = logging.getLogger("hesd")

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@contextmanager
def model_state(model: nn.Module, mode: str, math_attention: bool = True) -> Iterator[None]:
    """Put ``model`` in ``mode`` (``"eval"`` or ``"train"``) and restore it afterwards.

    In train mode every buffer (BatchNorm running statistics, ``num_batches_tracked``) is
    snapshotted and restored, so taking Hessians never changes the model. Inside,
    ``scaled_dot_product_attention`` uses its math backend (module docs) unless
    ``math_attention=False`` (passes that need gradients only).
    """
    flags = [(m, m.training) for m in model.modules()]
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    if mode == "train":
        saved = [(b, b.detach().clone()) for b in model.buffers()]
        model.train()
    else:
        model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH) if math_attention else nullcontext():
            yield
    finally:
        if saved:
            with torch.no_grad():
                for b, copy in saved:
                    b.copy_(copy)
        for m, flag in flags:
            m.training = flag


@contextmanager
def float32_precision(allow_tf32: bool, device: torch.device) -> Iterator[None]:
    """Full float32 precision inside the block unless ``allow_tf32``.

    Matrix products do not round to TensorFloat-32 or bfloat16
    (``torch.set_float32_matmul_precision``, which oneDNN honours on the CPU too) and, on a
    GPU, neither do cuDNN convolutions. Settings already at full precision are left alone
    (each costs microseconds, a product of a small MLP under a millisecond); the others are
    restored after.
    """
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


@contextmanager
def backend_enabled(backend: Any, enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn`` or ``torch.backends.mkldnn`` switched on or off inside the block."""
    before = backend.enabled
    backend.enabled = enabled
    try:
        yield
    finally:
        backend.enabled = before


class ForwardContext:
    """How hesd runs the model: mode, BatchNorm form, attention kernel, precision, autocast.

    Args:
        model: the network.
        model_mode: ``"eval"`` or ``"train"``.
        eval_batchnorm: ``"affine"`` or ``"native"`` (see :class:`hesd.HessianOperator`).
        allow_tf32: let float32 products round to TensorFloat-32.
        autocast_dtype: run forward passes under ``torch.autocast`` in this dtype.
        caller: the public function's name, for messages.

    Raises:
        HesdValueError: an unknown mode or BatchNorm form, or ``model_mode="train"`` with active
            dropout (products would be random).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        model_mode: str = "eval",
        eval_batchnorm: str = "affine",
        allow_tf32: bool = False,
        autocast_dtype: torch.dtype | None = None,
        caller: str = "HessianOperator",
    ) -> None:
        check_choice(model_mode, ("eval", "train"), "model_mode", caller)
        check_choice(eval_batchnorm, ("affine", "native"), "eval_batchnorm", caller)
        if model_mode == "train":
            drop = [n for n, m in model.named_modules() if isinstance(m, DROPOUT_TYPES) and m.p > 0]
            if drop:
                raise HesdValueError(
                    f"{caller}: model_mode='train' with active dropout {drop} makes Hessian-vector products random; "
                    "use model_mode='eval' or set the dropout probability to 0"
                )
        self.model = model
        self.model_mode = model_mode
        self.eval_batchnorm = eval_batchnorm
        self.allow_tf32 = bool(allow_tf32)
        self.autocast_dtype = autocast_dtype
        self.affine_batchnorm = (
            eval_batchnorm == "affine" and model_mode == "eval" and has_running_stat_batchnorm(model)
        )
        self.recurrent = any(isinstance(m, nn.RNNBase) for m in model.modules())
        self.float64 = any(p.dtype == torch.float64 for p in model.parameters())
        self.hf_configs = hf_configs(model)
        #: dropout probabilities in a transformers config, named by the determinism check if it fails
        self.config_dropout = config_dropout(self.hf_configs)
        self._said: set[str] = set()

    @contextmanager
    def state(self, second_order: bool = True) -> Iterator[None]:
        """The model in ``model_mode`` (restored after), BatchNorm as its affine map if chosen, RNNs native.

        ``second_order=False``: passes that take gradients only (finite differences) keep the
        model's attention kernel and gradient checkpointing.
        """
        on_gpu = self.recurrent and any(p.is_cuda for p in self.model.parameters())
        with (
            model_state(self.model, self.model_mode, math_attention=second_order),
            affine_eval_batchnorm(self.affine_batchnorm),
            backend_enabled(torch.backends.cudnn, False) if on_gpu else nullcontext(),
            KeepFloat64() if self.float64 else nullcontext(),
            transformer_state(self.model, self.hf_configs, self.model_mode, self._say, second_order)
            if self.hf_configs
            else nullcontext(),
        ):
            yield

    def _say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            logger.warning("hesd: %s.", message)

    @contextmanager
    def functional(self) -> Iterator[None]:
        """What forward-over-reverse adds to :meth:`state`: a float32 LSTM off oneDNN's fused kernel."""
        with backend_enabled(torch.backends.mkldnn, False) if self.recurrent else nullcontext():
            yield

    def precision(self, device: torch.device) -> Any:
        """Full float32 precision inside products, unless ``allow_tf32``."""
        return float32_precision(self.allow_tf32, device)

    def autocast(self, device: torch.device) -> Any:
        """``torch.autocast`` in ``autocast_dtype`` for one forward pass, or a context that does nothing."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)
