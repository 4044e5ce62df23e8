"""`arnoldi`: the top-`rank` eigenpairs of the Gauss-Newton (or Hessian) from Arnoldi iteration
(Schioppa et al. 2022); directions outside that eigenspace get no weight."""

from __future__ import annotations

from audit.influence.curvature import EigenCurvature
from audit.influence.curvature.arnoldi import fit_arnoldi
from audit.influence.registry import InfluenceMethod, damped, register

register(
    InfluenceMethod(
        name="arnoldi",
        precondition=damped,
        fit=fit_arnoldi,
        restore=lambda state, ctx: EigenCurvature.from_state(state),
        hessian=True,
    )
)
