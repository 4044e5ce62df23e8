"""`graddot`: g_q . g_i / damping (damping None -> 1), the fast baseline the correction flow
re-scores with."""

from __future__ import annotations

from audit.influence.registry import InfluenceMethod, register


def _scaled(ctx, curvature):
    damping = ctx.config.damping or 1.0
    return (lambda g: g / damping), damping


register(InfluenceMethod(name="graddot", precondition=_scaled))
