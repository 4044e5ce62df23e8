"""`ekfac` (the default): Kronecker-factored Gauss-Newton per Linear/Conv2d layer with the
eigenvalue correction (George et al. 2018); an exact diagonal for every other parameter."""

from __future__ import annotations

from audit.influence.curvature.kfac import KroneckerCurvature, fit_kronecker
from audit.influence.registry import InfluenceMethod, damped, register

register(
    InfluenceMethod(
        name="ekfac",
        precondition=damped,
        fit=lambda ctx, train, n: fit_kronecker(ctx, train, n, corrected=True),
        restore=lambda state, ctx: KroneckerCurvature.from_state(state, ctx.space),
    )
)
