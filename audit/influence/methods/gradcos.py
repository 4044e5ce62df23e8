"""`gradcos`: cosine of the query's and the training example's gradients. No self-influence: every
example's cosine with itself is 1. Damping is ignored."""

from __future__ import annotations

from audit.influence.registry import InfluenceMethod, register, unit_rows

register(
    InfluenceMethod(
        name="gradcos",
        precondition=lambda ctx, curvature: (unit_rows, None),
        unit_train_gradients=True,
        self_influence=False,
    )
)
