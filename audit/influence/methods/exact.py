"""`exact`: the explicit P x P curvature (P <= max_exact_params), the reference the other methods are
tested against. The damped Gauss-Newton is solved by Cholesky, the Hessian eigendecomposed."""

from __future__ import annotations

from collections.abc import Mapping

from audit.influence.curvature import Curvature, EigenCurvature
from audit.influence.curvature.exact import MatrixCurvature, fit_exact
from audit.influence.registry import InfluenceMethod, damped, register


def _restore(state: Mapping, ctx) -> Curvature:
    # fit_exact returns a MatrixCurvature for the Gauss-Newton, an EigenCurvature for the Hessian
    if "matrix" in state:
        return MatrixCurvature.from_state(state)
    return EigenCurvature.from_state(state)


register(InfluenceMethod(name="exact", precondition=damped, fit=fit_exact, restore=_restore, hessian=True))
