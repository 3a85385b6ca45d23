r"""Which parameters a Hessian is taken over, and how they lie in one flat vector.

A network's parameters :math:`\theta_1, \dots, \theta_m` (tensors of any shape) are the one
vector :math:`\theta = (\operatorname{vec}\theta_1, \dots, \operatorname{vec}\theta_m) \in
\mathbb{R}^P`; every operator in hesd works on such vectors, and every product method turns
them into per-parameter tensors and back. :class:`ParameterLayout` is that map, in one place.

Examples:
    >>> import torch
    >>> from hesd.operators import ParameterLayout
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))
    >>> layout = ParameterLayout.select(model, ["2.*"])
    >>> layout.names, layout.dim
    (['2.weight', '2.bias'], 3)
    >>> [t.shape for t in layout.unflatten(torch.arange(3.0))]
    [torch.Size([1, 2]), torch.Size([1])]
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import HesdTypeError, HesdValueError

__all__ = ["ParameterLayout", "is_pattern"]


def is_pattern(name: str) -> bool:
    """Whether ``name`` is an ``fnmatch`` pattern (holds ``*``, ``?`` or ``[``) rather than a name."""
    return any(c in name for c in "*?[")


class ParameterLayout:
    """The selected parameters of a model and the flat layout of their entries.

    Attributes:
        names: parameter names, in the order of the flat vector.
        params: the parameters themselves (the model's tensors, not copies).
        shapes: their shapes.
        numels: their entry counts.
        dim: ``P``, the length of the flat vector.
        dtype: the parameters' dtype (one for all).
        device: the parameters' device (one for all).
        defined: ``(P,)`` mask of the coordinates whose gradient is defined, or ``None`` (all).
            Set by :meth:`select` for the padding rows of ``nn.Embedding(padding_idx=...)``
            weights used by no other module: autograd gives those rows no gradient, so a
            reverse-over-reverse product sees no curvature there while forward-over-reverse
            sees the lookup. hesd takes the Hessian over the defined coordinates
            (:math:`D H D` with :math:`D` this mask), on which every product method agrees. A
            padding row tied to another module (an output layer) has a gradient and is kept.
    """

    def __init__(self, names: Sequence[str], params: Sequence[torch.Tensor], caller: str = "ParameterLayout") -> None:
        if not params:
            raise HesdValueError(f"{caller}: no parameters selected")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise HesdValueError(
                f"{caller}: the selected parameters mix dtypes {sorted(map(str, dtypes))} or devices "
                f"{sorted(map(str, devices))}; convert the model with model.to(dtype, device)"
            )
        if not params[0].is_floating_point():
            raise HesdTypeError(f"{caller}: parameters must be floating point, got {params[0].dtype}")
        self.names = list(names)
        self.params = list(params)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = sum(self.numels)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.defined: torch.Tensor | None = None

    @classmethod
    def select(cls, model: nn.Module, params: Any = None, caller: str = "ParameterLayout") -> ParameterLayout:
        """The parameters of ``model`` that ``params`` selects.

        Args:
            model: the network.
            params: ``None`` (every parameter with ``requires_grad``); or a sequence (or the keys
                of a dict) of parameter names, ``fnmatch`` patterns of names (``"layers.3.*"``,
                ``"*lora_*"``: every trainable parameter that matches) and parameters of the
                model. The order is the model's.
            caller: the public function's name, for messages.

        Raises:
            HesdValueError: a name the model does not have, a pattern that matches no trainable
                parameter, a parameter listed twice, a frozen parameter named explicitly, or
                nothing trainable at all.
        """
        named = list(model.named_parameters())
        if params is None:
            chosen = [n for n, p in named if p.requires_grad]
            if not chosen:
                raise HesdValueError(
                    f"{caller}: the model has no trainable parameters (every parameter has requires_grad=False); "
                    "unfreeze the parameters to analyse, or pass params=[...]"
                )
            by_name = dict(named)
            return cls(chosen, [by_name[n] for n in chosen], caller)._mask_padding(model)
        if isinstance(params, (str, torch.Tensor)):
            params = [params]
        params = list(params.keys()) if isinstance(params, dict) else list(params)
        by_name = dict(named)
        by_id = {id(p): n for n, p in named}
        wanted: list[str] = []
        for item in params:
            if isinstance(item, str) and is_pattern(item):
                hits = [n for n, p in named if p.requires_grad and fnmatch.fnmatchcase(n, item)]
                if not hits:
                    raise HesdValueError(
                        f"{caller}: params patterns [{item!r}] match no trainable parameter of the model; its names "
                        f"look like {[n for n, _ in named[:4]]}"
                    )
                wanted.extend(h for h in hits if h not in wanted)
            elif isinstance(item, str):
                if item not in by_name:
                    raise HesdValueError(f"{caller}: the model has no parameter named {item!r}")
                if item in wanted:
                    raise HesdValueError(f"{caller}: params lists a parameter twice ({item!r})")
                wanted.append(item)
            elif isinstance(item, torch.Tensor) and id(item) in by_id:
                if by_id[id(item)] in wanted:
                    raise HesdValueError(f"{caller}: params lists a parameter twice ({by_id[id(item)]!r})")
                wanted.append(by_id[id(item)])
            else:
                raise HesdValueError(
                    f"{caller}: params must be parameter names, name patterns or parameters of the model, got {item!r}"
                )
        if not wanted:
            raise HesdValueError(f"{caller}: params selects no parameters; pass at least one name")
        frozen = [n for n in wanted if not by_name[n].requires_grad]
        if frozen:
            raise HesdValueError(f"{caller}: params includes frozen parameters {frozen}; set requires_grad=True first")
        order = {n: i for i, (n, _) in enumerate(named)}
        patterns = any(isinstance(i, str) and is_pattern(i) for i in params)
        names = sorted(wanted, key=order.__getitem__) if patterns else wanted
        return cls(names, [by_name[n] for n in names], caller)._mask_padding(model)

    def _mask_padding(self, model: nn.Module) -> ParameterLayout:
        """Set :attr:`defined` for untied embedding padding rows (class docs)."""
        uses: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        index = {id(p): i for i, p in enumerate(self.params)}
        offsets = [0]
        for n in self.numels:
            offsets.append(offsets[-1] + n)
        mask = None
        for module in model.modules():
            pad = getattr(module, "padding_idx", None)
            weight = getattr(module, "weight", None)
            if not isinstance(module, nn.Embedding) or pad is None or weight is None or id(weight) not in index:
                continue
            if uses[id(weight)] > 1:
                continue  # tied: the row has a gradient through the other use
            if mask is None:
                mask = torch.ones(self.dim, dtype=self.dtype, device=self.device)
            start = offsets[index[id(weight)]] + pad * weight.shape[1]
            mask[start : start + weight.shape[1]] = 0
        self.defined = mask
        return self

    # ------------------------------------------------------------------ vectors
    def flatten(self, tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
        """Per-parameter tensors (``None``: zeros) as one ``(P,)`` vector."""
        return torch.cat(
            [
                (t if t is not None else torch.zeros(s, dtype=self.dtype, device=self.device)).reshape(-1)
                for t, s in zip(tensors, self.shapes, strict=True)
            ]
        )

    def unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        """A ``(P,)`` vector as per-parameter views, shaped like the parameters."""
        return [c.view(s) for c, s in zip(torch.split(v, self.numels), self.shapes, strict=True)]

    def result(self, k: int) -> torch.Tensor:
        """An uninitialised ``(P, k)`` result of products, stored column by column.

        The transpose of a ``(k, P)`` tensor, so that each column is one contiguous vector:
        product methods write their per-parameter results straight into it
        (:meth:`column_views`), with no flat copy of each column and no zero fill, and a Lanczos
        recurrence takes its columns as rows without a copy. Half-precision layouts get a
        float32 result (products are accumulated in float32).
        """
        dtype = torch.float32 if self.dtype in (torch.bfloat16, torch.float16) else self.dtype
        return torch.empty(k, self.dim, dtype=dtype, device=self.device).T

    def column_views(self, out: torch.Tensor) -> list[torch.Tensor]:
        """Columns of ``out`` (``(P, k)``, a column slice of :meth:`result`) as per-parameter ``(k, *shape)`` views."""
        rows = out.T  # (k, P), each row contiguous
        k = rows.shape[0]
        return [c.view(k, *s) for c, s in zip(torch.split(rows, self.numels, dim=1), self.shapes, strict=True)]

    def unflatten_columns(self, V: torch.Tensor) -> list[torch.Tensor]:
        """``(P, k)`` columns as per-parameter tensors of shape ``(k, *param.shape)``."""
        k = V.shape[1]
        return [c.reshape(k, *s) for c, s in zip(torch.split(V.T, self.numels, dim=1), self.shapes, strict=True)]

    def as_dict(self, tensors: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-parameter tensors keyed by parameter name."""
        return dict(zip(self.names, tensors, strict=True))

    def vector(self) -> torch.Tensor:
        """The parameters' current values as one detached ``(P,)`` vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def values(self) -> dict[str, torch.Tensor]:
        """The parameters' current values, detached, keyed by name."""
        return {n: p.detach() for n, p in zip(self.names, self.params, strict=True)}

    def versions(self) -> list[int]:
        """The parameters' in-place version counters: they change when an optimiser steps."""
        return [p._version for p in self.params]

    def __repr__(self) -> str:
        return f"ParameterLayout({len(self.names)} tensors, dim={self.dim}, dtype={self.dtype}, device={self.device})"
