"""`tracin`: TracIn-CP (Pruthi et al. 2020), sum_k lr_k g_q(theta_k) . g_i(theta_k) over the
checkpoints the training run logged (loading and checks in audit/influence/tracin.py). No curvature,
no damping: each checkpoint contributes the gradient-descent step it took."""

from __future__ import annotations

from audit.influence.registry import InfluenceMethod, identity, register

register(InfluenceMethod(name="tracin", precondition=identity, needs_checkpoints=True))
