r"""The Hessian of a model sharded by PyTorch's FSDP2 (``fully_shard``), by shard-local finite differences.

Under FSDP2 each rank holds a shard of every parameter (a ``DTensor``); a forward pass gathers
the parameters it needs and a backward pass reduce-scatters the gradients back into shards. No
rank ever holds the whole model, and the gathered weights are not leaves of the graph, so double
backward with respect to the parameters is not available. :class:`FSDPHessianOperator` needs
gradients only:

.. math::

    (H v)_{\text{shard}} \approx
    \frac{\nabla L(\theta + \varepsilon v) - \nabla L(\theta - \varepsilon v)}{2 \varepsilon}\Big|_{\text{shard}}

Vectors are sharded like the parameters: rank :math:`r` holds, for each parameter, the rows of
its dimension 0 that FSDP2 gave it (:meth:`FSDPHessianOperator.local_rows` maps a whole vector
to them), so the Lanczos basis is divided across the ranks as the model is. Each rank perturbs
its own shards (:math:`\theta_0 \pm \varepsilon v`, from a saved copy, restored bit for bit),
runs the forward and backward passes over its data shard — every rank the same number of
batches, since FSDP2's collectives need all ranks — and reads its shard of the gradient. The
step :math:`\varepsilon` and every inner product of the Lanczos recurrence are sums over all
shards (:meth:`~FSDPHessianOperator.reduce_inner`), so each rank runs the same recurrence. The
step follows :mod:`hesd.operators.finite_difference` (its error analysis and its warning
about ReLU-type kinks apply unchanged).

The loss over all the data: each rank's batch losses are weighted by their items over all
ranks' items and scaled by the world size, because FSDP2 averages the shards' gradients over
the ranks; the result is the gradient of the mean over every item of every rank (tested against
one process with gloo).

Examples:
    Under ``torchrun``, after ``fully_shard`` (every rank, its own data shard)::

        H = FSDPHessianOperator(model, loss_fn, my_batches)
        spec = hesd.slq(H, num_steps=80, num_probes=3)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import HesdValueError
from .data import ModelCall, as_reiterable
from .finite_difference import TAU, check_model, relative_step
from .forward import ForwardContext
from .linear import LinearOperator
from .loss import LossBatch, LossContract
from .model_loss import loss_contract
from .sharded import RankShards

__all__ = ["FSDPHessianOperator", "is_fsdp_model"]


def is_fsdp_model(model: nn.Module) -> bool:
    """Whether ``model``'s trainable parameters are FSDP2 shards (``DTensor``; ``fully_shard`` was called on it)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without DTensor
        return False
    return any(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)


def _sharded_params(model: nn.Module) -> list[Any]:
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    plain = [n for n, p in model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if not params or plain:
        raise HesdValueError(
            f"FSDPHessianOperator: the model's parameters {plain[:3] or '[]'} are not sharded by FSDP2; call "
            "torch.distributed.fsdp.fully_shard on it first, or use hesd.HessianOperator for an unsharded model"
        )
    return params


class FSDPHessianOperator(RankShards, LinearOperator):
    """Finite-difference Hessian of an FSDP2 model over all ranks' data, vectors sharded like the parameters.

    Args:
        model: a model whose trainable parameters ``fully_shard`` has made ``DTensor`` shards
            on a one-dimensional device mesh (``Shard(0)``).
        loss_fn: as for :class:`hesd.HessianOperator` (``None``: the model's own loss).
        data: this rank's batches; every rank must hold the same number of batches.
        fd_step: the relative step (default :func:`~hesd.operators.finite_difference.relative_step`).

    Attributes:
        shape: ``(n, n)``, ``n`` the entries of this rank's shards.
        num_samples: items over all ranks.

    Raises:
        HesdValueError: the parameters are not FSDP2 shards, or the ranks hold different
            numbers of batches (FSDP2's collectives would hang).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable | LossContract | None, data: Any, *,
                 fd_step: float | None = None) -> None:  # fmt: skip
        self.model = model
        self.params = _sharded_params(model)
        mesh = self.params[0].device_mesh
        if mesh.ndim != 1:
            raise HesdValueError("FSDPHessianOperator: only a one-dimensional device mesh (plain FSDP2) is supported")
        self.group = mesh.get_group()
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.locals = [p.to_local().detach() for p in self.params]  # views of the shards, written in place
        self.dtype, self.device = self.locals[0].dtype, self.locals[0].device
        check_model(model, self.dtype, "FSDPHessianOperator")
        # the state every hesd forward runs in (eval mode, a float64 model's loss kept in float64, a transformers
        # model's cache off, full float32 precision); gradients only, so the model's own attention kernel
        self.forward = ForwardContext(model, caller="FSDPHessianOperator")
        n = sum(t.numel() for t in self.locals)
        self.shape = (n, n)
        self.n = sum(p.numel() for p in self.params)
        self.rel = fd_step or relative_step(self.dtype)
        self.contract = loss_contract(loss_fn, "FSDPHessianOperator")
        self.contract.bind(model)
        raw = list(as_reiterable(data, "FSDPHessianOperator", allow_empty=True))
        self.batches: list[LossBatch] = [b for b in (self.contract.prepare(r, self.device, self.dtype) for r in raw)
                                         if b is not None]  # fmt: skip
        # on the shards' device: NCCL gathers GPU tensors only
        counts = torch.tensor([[float(len(self.batches)), float(sum(b.count for b in self.batches))]],
                              dtype=torch.float64, device=self.device)  # fmt: skip
        every = [torch.zeros_like(counts) for _ in range(self.world)]
        dist.all_gather(every, counts, group=self.group)
        per_rank = [int(t[0, 0]) for t in every]
        if len(set(per_rank)) != 1:
            raise HesdValueError(
                f"FSDPHessianOperator: the ranks hold {per_rank} batches; FSDP2 gathers parameters in every forward "
                "pass, so every rank needs the same number of batches (split the data evenly)"
            )
        self.num_samples = float(sum(float(t[0, 1]) for t in every))
        self.num_matvecs = 0
        squares = torch.tensor([sum(float((t.double() ** 2).sum()) for t in self.locals)], dtype=torch.float64)
        self.tau = TAU * math.sqrt(float(self.reduce_inner(squares)) / self.n)

    # ------------------------------------------------------------------ sharded vectors
    def local_rows(self, V: torch.Tensor) -> torch.Tensor:
        """The rows of whole vectors ``V`` (``(P, k)``, parameters in ``model.parameters()`` order) on this rank."""
        out, offset = [], 0
        for p, local in zip(self.params, self.locals, strict=True):
            rows0 = p.shape[0] if p.dim() else 1
            inner = p.numel() // max(rows0, 1)
            chunk = -(-rows0 // self.world)
            start = min(self.rank * chunk, rows0)
            here = local.shape[0] if local.dim() else 1
            out.append(V[offset + start * inner : offset + (start + here) * inner])
            offset += p.numel()
        return torch.cat(out)

    def vector(self) -> torch.Tensor:
        """This rank's shard of the parameters, as one vector (rows as in :meth:`local_rows`)."""
        return torch.cat([t.reshape(-1) for t in self.locals])

    def loss(self) -> float:
        """The loss over all ranks' data: the mean over every loss-bearing item (every rank gets it)."""
        total = 0.0
        with torch.no_grad(), self.forward.state(second_order=False), self.forward.precision(self.device):
            for batch in self.batches:
                loss = self.contract.loss(ModelCall(self.model), batch)
                total += float(loss) * self.contract.weight(batch.count, self.num_samples)
        return float(self.reduce_inner(torch.tensor([total], dtype=torch.float64))[0])

    # ------------------------------------------------------------------ products
    def gradient(self) -> torch.Tensor:
        """This rank's shard of the gradient of the loss over all ranks' data."""
        for p in self.params:
            p.grad = None
        with self.forward.state(second_order=False), self.forward.precision(self.device), torch.enable_grad():
            for batch in self.batches:
                loss = self.contract.loss(ModelCall(self.model), batch)
                # FSDP2 averages the shards' gradients over the ranks: scale back to a sum of weighted losses
                (loss * (self.contract.weight(batch.count, self.num_samples) * self.world)).backward()
        grads = [p.grad.to_local() if p.grad is not None else torch.zeros_like(t)
                 for p, t in zip(self.params, self.locals, strict=True)]  # fmt: skip
        return torch.cat([g.reshape(-1) for g in grads])

    def _step(self, pieces: list[torch.Tensor]) -> float:
        sums = torch.tensor([sum(float(((t.double() * d.double()) ** 2).sum()) for t, d in
                                 zip(self.locals, pieces, strict=True)),
                             sum(float((d.double() ** 2).sum()) for d in pieces),
                             sum(float((d.double() ** 4).sum()) for d in pieces)], dtype=torch.float64)  # fmt: skip
        num, v2, v4 = (float(x) for x in self.reduce_inner(sums))
        return self.rel * math.sqrt(num + self.tau**2 * v2) / math.sqrt(v4) if v4 > 0 else 0.0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        theta0 = [t.detach().clone() for t in self.locals]
        out = torch.zeros_like(V)
        try:
            for j in range(V.shape[1]):
                pieces = list(torch.split(V[:, j], [t.numel() for t in self.locals]))
                pieces = [d.view_as(t) for d, t in zip(pieces, self.locals, strict=True)]
                eps = self._step(pieces)
                if eps == 0.0:
                    continue  # the zero vector (on every rank: the step is a global sum)
                grads = []
                for sign in (1.0, -1.0):
                    with torch.no_grad():
                        for t, t0, d in zip(self.locals, theta0, pieces, strict=True):
                            torch.add(t0, d, alpha=sign * eps, out=t)
                    grads.append(self.gradient())
                out[:, j] = (grads[0] - grads[1]) / (2.0 * eps)
        finally:
            with torch.no_grad():
                for t, t0 in zip(self.locals, theta0, strict=True):
                    t.copy_(t0)
            for p in self.params:
                p.grad = None
        self.num_matvecs += V.shape[1]
        return out
