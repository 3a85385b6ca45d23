"""A small symmetric linear-operator abstraction shared by every algorithm.

Algorithms in :mod:`hesd.algorithms` only need ``shape``, ``dtype``, ``device`` and a
matrix-matrix product. :func:`as_operator` wraps a dense ``torch.Tensor``, a NumPy
array or a SciPy ``LinearOperator`` so the same code runs on plain matrices (for
testing) and on Hessians of networks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse.linalg as spla
import torch

from ..errors import HesdTypeError, HesdValueError

__all__ = ["LinearOperator", "MatrixOperator", "ScipyOperator", "as_operator"]


class LinearOperator:
    """A symmetric linear operator ``A`` of shape ``(n, n)`` acting on torch tensors.

    Subclasses implement :meth:`_matmat` for a ``(n, k)`` tensor of the operator's
    dtype and device. ``A @ v`` accepts ``(n,)`` or ``(n, k)`` and validates it.

    Attributes:
        shape: ``(n, n)``.
        dtype: floating dtype of products.
        device: device of products.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    #: Number of operator-vector products performed so far (columns count one each).
    num_matvecs: int = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_vector(self, v: Any, caller: str) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            raise HesdTypeError(
                f"{caller}: expected a torch.Tensor, got {type(v).__name__}; use .to_scipy() to work with NumPy arrays"
            )
        n = self.shape[0]
        if v.ndim not in (1, 2) or v.shape[0] != n:
            raise HesdValueError(f"{caller}: expected a vector of shape ({n},) or ({n}, k), got {tuple(v.shape)}")
        if v.dtype != self.dtype:
            raise HesdTypeError(
                f"{caller}: vector dtype {v.dtype} does not match the operator's {self.dtype}; "
                f"convert it with v.to({self.dtype})"
            )
        return v.to(self.device)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        v = self._check_vector(v, f"{type(self).__name__} @ v")
        if v.ndim == 1:
            return self._matmat(v.unsqueeze(1)).squeeze(1)
        return self._matmat(v)

    # ------------------------------------------------------------------ sharded vectors
    # An operator whose vectors are split across ranks (hesd.operators.sharded) overrides these;
    # algorithms call them so that the same code runs on whole and on sharded vectors.

    @property
    def full_dim(self) -> int:
        """The dimension of the whole vector space (``shape[0]`` unless vectors are sharded)."""
        return self.shape[0]

    def local_rows(self, V: torch.Tensor) -> torch.Tensor:
        """This rank's rows of whole vectors ``V`` (``(full_dim, k)``); ``V`` itself unless sharded."""
        return V

    def reduce_inner(self, t: torch.Tensor) -> torch.Tensor:
        """Sum partial inner products over the ranks that hold the other rows; ``t`` unless sharded."""
        return t

    @property
    def sharded(self) -> bool:
        """Whether vectors are split across ranks (then inner products go through :meth:`reduce_inner`)."""
        return False

    def start_direction(self) -> torch.Tensor | None:
        """A direction that Krylov methods may mix into their random start vector, or ``None``.

        :class:`hesd.HessianOperator` returns the loss gradient (see
        :func:`hesd.eigenvalues`); plain matrices have none.
        """
        return None

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``A @ v`` for ``v`` of shape ``(n,)`` or ``(n, k)``."""
        return self @ v

    def to_scipy(self) -> spla.LinearOperator:
        """Return a :class:`scipy.sparse.linalg.LinearOperator` view (NumPy in, NumPy out).

        Examples:
            >>> import torch, hesd
            >>> A = hesd.operators.MatrixOperator(torch.eye(3, dtype=torch.float64))
            >>> A.to_scipy().matvec([1.0, 2.0, 3.0])
            array([1., 2., 3.])
        """
        np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype

        def matmat(X: np.ndarray) -> np.ndarray:
            X = np.asarray(X)
            squeeze = X.ndim == 1
            T = torch.as_tensor(np.atleast_2d(X.T).T.copy(), dtype=self.dtype, device=self.device)
            out = self._matmat(T).detach().cpu().numpy()
            return out[:, 0] if squeeze else out

        return spla.LinearOperator(
            self.shape,
            matvec=matmat,
            rmatvec=matmat,
            matmat=matmat,
            rmatmat=matmat,
            dtype=np_dtype,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"


class MatrixOperator(LinearOperator):
    """Wrap a dense symmetric ``torch.Tensor`` (symmetry is the caller's promise)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise HesdValueError(f"MatrixOperator: expected a square matrix, got shape {tuple(matrix.shape)}")
        if not matrix.is_floating_point():
            raise HesdTypeError(f"MatrixOperator: expected a floating-point matrix, got {matrix.dtype}")
        self.matrix = matrix
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_matvecs = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += V.shape[1]
        return self.matrix @ V


class ScipyOperator(LinearOperator):
    """Wrap a SciPy ``LinearOperator`` or NumPy array; products run in float64 on the CPU."""

    def __init__(self, op: Any) -> None:
        self.op = spla.aslinearoperator(op)
        if self.op.shape[0] != self.op.shape[1]:
            raise HesdValueError(f"ScipyOperator: expected a square operator, got shape {self.op.shape}")
        self.shape = (int(self.op.shape[0]), int(self.op.shape[1]))
        self.dtype = torch.float64
        self.device = torch.device("cpu")
        self.num_matvecs = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += V.shape[1]
        out = self.op.matmat(V.detach().cpu().numpy())
        return torch.as_tensor(np.asarray(out), dtype=torch.float64)


def as_operator(A: Any, caller: str = "as_operator") -> LinearOperator:
    """Return ``A`` as a :class:`LinearOperator`.

    Args:
        A: a ``LinearOperator`` (e.g. :class:`hesd.HessianOperator`), a square
            ``torch.Tensor``, a NumPy array or a SciPy ``LinearOperator``.
        caller: the public function's name, used in error messages.
    """
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, torch.Tensor):
        return MatrixOperator(A)
    if isinstance(A, (np.ndarray, spla.LinearOperator)) or hasattr(A, "matvec"):
        return ScipyOperator(A)
    raise HesdTypeError(
        f"{caller}: expected a hesd operator, a torch.Tensor, a NumPy array or a SciPy LinearOperator, "
        f"got {type(A).__name__}"
    )
