"""`exact`: the explicit P x P curvature of the mean training loss, eigendecomposed (small models;
the reference the approximate methods are tested against).

Gauss-Newton (default): G = 1/N sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i, positive semi-definite,
built from per-example Gauss-Newton factors. Hessian (`curvature="hessian"`): 1/N sum_i
d^2 CE_i / d theta^2 by forward-over-reverse AD; it is indefinite away from a minimum.
"""

from __future__ import annotations

import torch
from torch.func import hessian
from torch.utils.data import Dataset

from audit.errors import UnsupportedModel
from audit.influence.context import Context
from audit.influence.curvature import EigenCurvature, eigen_from_matrix


def gauss_newton_matrix(ctx: Context, data: Dataset, n: int) -> torch.Tensor:
    """1/n sum_i J_i^T H_i J_i over `data` (n examples): float64 [P, P]."""
    generator = torch.Generator().manual_seed(ctx.config.seed)
    total = torch.zeros(ctx.space.dim, ctx.space.dim, dtype=torch.float64, device=ctx.device)
    for inputs, labels in ctx.batches(data, "exact: Gauss-Newton"):
        for factors in ctx.gn_factors(inputs, labels, generator):  # [b, K, P]
            flat = factors.reshape(-1, ctx.space.dim).to(torch.float64)
            total += flat.T @ flat
    return total / n


def hessian_matrix(ctx: Context, data: Dataset, n: int) -> torch.Tensor:
    """1/n sum_i Hessian of CE_i w.r.t. the selected parameters: float64 [P, P]."""
    space, grads = ctx.space, ctx.grads
    theta = space.flatten({k: v.unsqueeze(0) for k, v in grads.selected.items()}, lead=1)[0]  # [P]
    total = torch.zeros(space.dim, space.dim, dtype=torch.float64, device=ctx.device)
    for inputs, labels in ctx.batches(data, "exact: Hessian"):

        def batch_loss(flat: torch.Tensor) -> torch.Tensor:
            logits = grads.forward(space.unflatten(flat), inputs)
            return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")

        try:
            total += hessian(batch_loss)(theta).to(torch.float64)
        except RuntimeError as exc:
            raise UnsupportedModel(
                f"The exact Hessian needs forward-over-reverse AD through the model, which failed ({exc}); "
                "use curvature='gn' or method='arnoldi'."
            ) from exc
    return total / n


def fit_exact(ctx: Context, data: Dataset, n: int) -> EigenCurvature:
    """Eigendecomposition of the exact curvature (GN or Hessian per ctx.config.curvature)."""
    if ctx.space.dim > ctx.config.max_exact_params:
        raise UnsupportedModel(
            f"method='exact' builds a P x P matrix and allows P <= {ctx.config.max_exact_params}; the selected "
            f"parameters have P = {ctx.space.dim}. Use method='ekfac' or 'arnoldi', or select fewer parameters "
            "with param_filter."
        )
    if ctx.config.curvature == "gn":
        return eigen_from_matrix(gauss_newton_matrix(ctx, data, n), psd=True)
    return eigen_from_matrix(hessian_matrix(ctx, data, n), psd=False)
