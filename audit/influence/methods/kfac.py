"""`kfac`: the Kronecker-factored Gauss-Newton of `ekfac` without the eigenvalue correction pass."""

from __future__ import annotations

from audit.influence.curvature.kfac import KroneckerCurvature, fit_kronecker
from audit.influence.registry import InfluenceMethod, damped, register

register(
    InfluenceMethod(
        name="kfac",
        precondition=damped,
        fit=lambda ctx, train, n: fit_kronecker(ctx, train, n, corrected=False),
        restore=lambda state, ctx: KroneckerCurvature.from_state(state, ctx.space),
    )
)
