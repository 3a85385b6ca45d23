"""What a Hugging Face ``transformers`` model needs switched for Hessian-vector products, and back.

Entered by :meth:`hesd.operators.forward.ForwardContext.state` around every pass; ``transformers``
is not imported (models are recognised by their ``config``):

* **attention kernels without a second derivative** — ``flash_attention_2``/``_3``,
  ``flex_attention`` and hub kernels — are switched to ``"sdpa"`` (run on its math kernel,
  :mod:`hesd.operators.forward`) with ``model.set_attn_implementation`` and switched back after;
  ``"eager"`` and ``"sdpa"`` are kept. A model that cannot switch is refused with a message
  naming ``attn_implementation``;
* **gradient checkpointing** (``model.gradient_checkpointing_enable()``) recomputes the forward
  pass inside the backward, which double backward cannot go through; ``transformers`` applies it
  in training mode only, so under ``model_mode="train"`` each layer's flag is turned off and
  restored (in ``"eval"`` mode it is inactive anyway);
* **the key/value cache** (``config.use_cache``) is turned off: products need no cache, and
  a cache would hold every layer's keys and values in each kept graph;
* **dropout in the config** (``attention_dropout``, ``hidden_dropout``, ``*_pdrop`` …) is
  applied by ``transformers`` in training mode without an ``nn.Dropout`` module, so
  :func:`config_dropout` lists it for the check that refuses random products.

Each switch is logged once per operator.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError

__all__ = ["TWICE_DIFFERENTIABLE_ATTENTION", "config_dropout", "hf_configs", "transformer_state"]

logger = logging.getLogger("hesd")

#: attention implementations whose kernels have a second derivative (``sdpa`` on its math kernel)
TWICE_DIFFERENTIABLE_ATTENTION = ("eager", "sdpa")


def hf_configs(model: nn.Module) -> list[Any]:
    """The distinct ``transformers`` configs of ``model`` and its submodules (PEFT wrappers included)."""
    seen: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict") and hasattr(config, "model_type"):
            seen.setdefault(id(config), config)
    return list(seen.values())


def config_dropout(configs: list[Any]) -> list[str]:
    """``"field=value"`` for every positive dropout probability in these ``transformers`` configs."""
    found = []
    for config in configs:
        for key, value in config.to_dict().items():
            lowered = key.lower()
            if ("dropout" in lowered or lowered.endswith("pdrop")) and isinstance(value, float) and value > 0:
                found.append(f"{key}={value}")
    return found


def _attention_owner(model: nn.Module) -> Any:
    for module in model.modules():
        config = getattr(module, "config", None)
        if callable(getattr(module, "set_attn_implementation", None)) and config is not None:
            return module
    return None


@contextmanager
def _switch_attention(model: nn.Module, say: Any) -> Iterator[None]:
    owner = _attention_owner(model)
    current = getattr(getattr(owner, "config", None), "_attn_implementation", None)
    if owner is None or current is None or current in TWICE_DIFFERENTIABLE_ATTENTION:
        yield
        return
    try:
        owner.set_attn_implementation("sdpa")
    except Exception as exc:
        raise UnsupportedModelError(
            f"the model's attention ({current!r}) has no second derivative and it cannot be switched to 'sdpa' "
            f"({type(exc).__name__}: {exc}). Load the model with attn_implementation='sdpa' or 'eager' for the "
            "analysis, or hvp_method='finite_difference', which needs gradients only"
        ) from exc
    say(f"attention {current!r} has no second derivative: products run with 'sdpa' (math kernel), switched back after")
    try:
        yield
    finally:
        owner.set_attn_implementation(current)


@contextmanager
def transformer_state(
    model: nn.Module, configs: list[Any], model_mode: str, say: Any, second_order: bool = True
) -> Iterator[None]:
    """The switches of the module docs, restored on exit; ``say(message)`` logs a switch.

    ``configs``: the model's configs (:func:`hf_configs`, found once per operator, not per pass).
    ``second_order=False`` (finite-difference products, which need gradients only): the
    attention kernel and gradient checkpointing stay as the model has them.
    """
    configs = [c for c in configs if getattr(c, "use_cache", None)]
    checkpointed = []
    if model_mode == "train" and second_order:
        checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    if checkpointed:
        say("gradient checkpointing is off during products (double backward cannot recompute), restored after")
    with ExitStack() as stack:
        for config in configs:
            config.use_cache = False
            stack.callback(setattr, config, "use_cache", True)
        for module in checkpointed:
            setattr(module, "gradient_checkpointing", False)  # noqa: B010 - an attribute of transformers layers
            stack.callback(setattr, module, "gradient_checkpointing", True)
        if second_order:
            stack.enter_context(_switch_attention(model, say))
        yield
