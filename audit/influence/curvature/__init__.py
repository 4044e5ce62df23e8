"""Fitted curvatures and the one operation scoring needs from them: g -> (C + damping I)^-1 g.

- `EigenCurvature`: eigenpairs (all of them for `exact`, the top ones for `arnoldi`);
- `KroneckerCurvature` (kfac.py): per-layer Kronecker eigenbases (KFAC / EK-FAC) plus a diagonal
  for parameters outside supported layers.
Curvatures are fitted without damping; `resolve_damping` picks it afterwards, so a cached
curvature serves every damping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from audit.errors import NumericalError


class Curvature(Protocol):
    mean_eigenvalue: float  # trace / P of the fitted curvature (damping=None scales it)

    def apply(self, grads: torch.Tensor, damping: float) -> torch.Tensor:
        """(C + damping I)^-1 grads for grads [B, P]; [B, P] in the dtype of `grads`."""
        ...

    def check(self, damping: float) -> None:
        """Raise NumericalError if C + damping I is singular or not finite."""
        ...

    def state(self) -> dict[str, torch.Tensor]: ...


def resolve_damping(curvature: Curvature, damping: float | None, scale: float) -> float:
    """`damping`, or `scale` x the mean eigenvalue of `curvature` when None (then checked)."""
    if damping is None:
        mean = abs(curvature.mean_eigenvalue)
        if not mean > 0 or not torch.isfinite(torch.tensor(mean)):
            raise NumericalError(
                f"Cannot choose a damping: the fitted curvature has mean eigenvalue {mean}; "
                "pass damping=... explicitly."
            )
        damping = scale * mean
    curvature.check(damping)
    return float(damping)


@dataclass(frozen=True)
class EigenCurvature:
    """C ~ V diag(values) V^T with V [P, r] orthonormal columns (r = P: exact; r < P: the top-r
    eigenspace only, as in Schioppa et al. 2022 - directions outside it get no weight)."""

    values: torch.Tensor  # [r] float64
    vectors: torch.Tensor  # [P, r] float64
    mean_eigenvalue: float

    def check(self, damping: float) -> None:
        shifted = self.values + damping
        scale = max(self.values.abs().max().item(), damping)
        if not torch.isfinite(shifted).all():
            raise NumericalError("The fitted curvature has non-finite eigenvalues; check the model's loss for NaN/inf.")
        if shifted.abs().min().item() <= 1e-12 * scale:
            raise NumericalError(
                f"curvature + damping is singular (an eigenvalue is {-damping:.3g}); "
                "change damping or use the Gauss-Newton curvature."
            )

    def apply(self, grads: torch.Tensor, damping: float) -> torch.Tensor:
        # in the gradients' dtype: float64 models get float64 scores, float32 models half the memory
        vectors = self.vectors.to(grads.device, grads.dtype)
        coeff = grads @ vectors  # [B, r]
        return (coeff / (self.values.to(grads.device, grads.dtype) + damping)) @ vectors.T  # [B, P]

    def state(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "vectors": self.vectors, "mean_eigenvalue": torch.tensor(self.mean_eigenvalue)}

    @staticmethod
    def from_state(state: dict[str, torch.Tensor]) -> EigenCurvature:
        return EigenCurvature(state["values"], state["vectors"], float(state["mean_eigenvalue"]))


def sym_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix, robust to the large exactly
    zero blocks Kronecker factors have (dead inputs, zero padding), on which LAPACK's divide and
    conquer can fail: zero rows/columns are split off as eigenvalue-0 unit vectors, and a failing
    `torch.linalg.eigh` falls back to SciPy's MRRR driver."""
    sym = (matrix + matrix.T) / 2
    active = sym.abs().sum(0) > 0  # [D]
    values = sym.new_zeros(len(sym))
    vectors = torch.eye(len(sym), dtype=sym.dtype, device=sym.device)
    idx = active.nonzero().squeeze(1)
    if len(idx) == 0:
        return values, vectors
    block = sym[idx][:, idx]
    try:
        block_values, block_vectors = torch.linalg.eigh(block)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        import scipy.linalg

        w, v = scipy.linalg.eigh(block.cpu().numpy(), driver="evr")
        block_values = torch.from_numpy(w).to(block)
        block_vectors = torch.from_numpy(v).to(block)
    values[idx] = block_values
    vectors[idx[:, None], idx[None, :]] = block_vectors
    order = torch.argsort(values)
    return values[order], vectors[:, order]


def eigen_from_matrix(matrix: torch.Tensor, psd: bool) -> EigenCurvature:
    """All eigenpairs of a symmetric [P, P] matrix (float64). `psd`: clip round-off negatives to 0."""
    if not torch.isfinite(matrix).all():
        raise NumericalError("The curvature matrix has non-finite entries; check the model's loss for NaN/inf.")
    sym = (matrix + matrix.T) / 2
    values, vectors = sym_eigh(sym)
    if psd:
        values = values.clamp_min(0.0)
    return EigenCurvature(values, vectors, float(torch.diagonal(sym).mean()))
