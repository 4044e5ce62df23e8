"""`exact`: the explicit P x P curvature of the mean training loss (small models; the reference
the approximate methods are tested against).

Gauss-Newton (default): G = 1/N sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i, positive semi-definite,
built from per-example Gauss-Newton factors. G + damping I is then positive definite, so it is
solved by a Cholesky factorisation (P^3 / 3 flops, about 20x cheaper than the eigendecomposition
on CPU). Hessian (`curvature="hessian"`): 1/N sum_i d^2 CE_i / d theta^2 by forward-over-reverse
AD; it is indefinite away from a minimum, so it is eigendecomposed to report singular shifts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.func import hessian
from torch.utils.data import Dataset

from audit.errors import NumericalError, UnsupportedModel
from audit.influence.context import Context
from audit.influence.curvature import Curvature, eigen_from_matrix


@dataclass(frozen=True)
class MatrixCurvature:
    """An explicit positive semi-definite curvature C [P, P] (float64); (C + damping I)^-1 by
    Cholesky, one factorisation per damping value, kept for later calls."""

    matrix: torch.Tensor  # [P, P] float64, symmetric
    mean_eigenvalue: float
    _factors: dict[float, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def _factor(self, damping: float) -> torch.Tensor:
        if damping not in self._factors:
            eye = torch.eye(len(self.matrix), dtype=self.matrix.dtype, device=self.matrix.device)
            factor, info = torch.linalg.cholesky_ex(self.matrix + damping * eye)
            if info.item() != 0:
                raise NumericalError(
                    f"curvature + damping is not positive definite at damping {damping:.3g}; raise damping."
                )
            self._factors[damping] = factor
        return self._factors[damping]

    def check(self, damping: float) -> None:
        if not torch.isfinite(self.matrix).all():
            raise NumericalError("The curvature matrix has non-finite entries; check the model's loss for NaN/inf.")
        self._factor(damping)

    def apply(self, grads: torch.Tensor, damping: float) -> torch.Tensor:
        factor = self._factor(damping)
        solved = torch.cholesky_solve(grads.T.to(factor.device, factor.dtype), factor)  # [P, B]
        return solved.T.to(grads.dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {"matrix": self.matrix, "mean_eigenvalue": torch.tensor(self.mean_eigenvalue)}

    @staticmethod
    def from_state(state: dict[str, torch.Tensor]) -> MatrixCurvature:
        return MatrixCurvature(state["matrix"], float(state["mean_eigenvalue"]))


def gauss_newton_matrix(ctx: Context, data: Dataset, n: int) -> torch.Tensor:
    """1/n sum_i J_i^T H_i J_i over `data` (n examples): float64 [P, P]."""
    generator = torch.Generator().manual_seed(ctx.config.seed)
    total = torch.zeros(ctx.space.dim, ctx.space.dim, dtype=torch.float64, device=ctx.device)
    for inputs, labels in ctx.batches(data, "exact: Gauss-Newton"):
        for factors in ctx.gn_factors(inputs, labels, generator):  # [b, K, P]
            # one batch's sum in the gradients' dtype (float32: twice the speed), totals in float64
            flat = factors.reshape(-1, ctx.space.dim)
            total += (flat.T @ flat).to(torch.float64)
    return total / n


def hessian_matrix(ctx: Context, data: Dataset, n: int) -> torch.Tensor:
    """1/n sum_i Hessian of CE_i w.r.t. the selected parameters: float64 [P, P]."""
    space, grads = ctx.space, ctx.grads
    theta = space.flatten({k: v.unsqueeze(0) for k, v in grads.selected.items()}, lead=1)[0]  # [P]
    total = torch.zeros(space.dim, space.dim, dtype=torch.float64, device=ctx.device)
    for inputs, labels in ctx.batches(data, "exact: Hessian"):

        def batch_loss(flat: torch.Tensor) -> torch.Tensor:  # used within this iteration only
            logits = grads.forward(space.unflatten(flat), inputs)  # noqa: B023
            return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")  # noqa: B023

        try:
            total += hessian(batch_loss)(theta).to(torch.float64)
        except RuntimeError as exc:
            raise UnsupportedModel(
                f"The exact Hessian needs forward-over-reverse AD through the model, which failed ({exc}); "
                "use curvature='gn' or method='arnoldi'."
            ) from exc
    return total / n


def fit_exact(ctx: Context, data: Dataset, n: int) -> Curvature:
    """The exact curvature: the GN matrix (Cholesky-solved) or the Hessian's eigendecomposition,
    per ctx.config.curvature."""
    if ctx.space.dim > ctx.config.max_exact_params:
        raise UnsupportedModel(
            f"method='exact' builds a P x P matrix and allows P <= {ctx.config.max_exact_params}; the selected "
            f"parameters have P = {ctx.space.dim}. Use method='ekfac' or 'arnoldi', or select fewer parameters "
            "with param_filter."
        )
    if ctx.config.curvature == "gn":
        matrix = gauss_newton_matrix(ctx, data, n)
        sym = (matrix + matrix.T) / 2
        return MatrixCurvature(sym, float(torch.diagonal(sym).mean()))
    return eigen_from_matrix(hessian_matrix(ctx, data, n), psd=False)
