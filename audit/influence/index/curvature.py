"""The index's curvature: per layer, the Gauss-Newton matrix of the mean training loss in the
projected space, block-diagonal over layers like K-FAC/EK-FAC.

Block l of an index row holds layer l's projected gradient (D_l = k_out x k_in columns). Shards
store, per layer, the sums that every choice below needs, so the curvature of any set of shards is
their sum over their rows: a growing training set adds to it without refitting the rest, and one
pass over the data suffices.
- G_l = (1/N) sum_i sum_k g_ik g_ik^T [D_l, D_l], g_ik the projected Gauss-Newton factors of
  example i (exact over classes, or sampled);
- the projected K-FAC factors A_l (layer inputs, mean over positions) and S_l (output gradients).
Choices (IndexConfig.curvature):
- "ekfac" (default): EK-FAC in the projected space: the eigenbasis Q = Q_S (x) Q_A of the
  projected factors, eigenvalues diag(Q^T G_l Q), which is EK-FAC's correction computed exactly
  from G_l (no second pass). Unprojected, it is the engine's `ekfac` on these layers.
- "gn": the full block G_l itself (damped projected Gauss-Newton).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from audit.errors import NumericalError
from audit.influence.curvature import sym_eigh
from audit.influence.index.sums import ShardSums

CURVATURES = ("ekfac", "gn")


@dataclass(frozen=True)
class ProjectedCurvature:
    """Eigenpairs of each block of the projected Gauss-Newton matrix (float64)."""

    blocks: tuple[int, ...]
    values: tuple[torch.Tensor, ...]  # [D_l]
    vectors: tuple[torch.Tensor, ...]  # [D_l, D_l]

    @staticmethod
    def fit(sums: ShardSums, n: int, kind: str = "ekfac") -> ProjectedCurvature:
        """The curvature of the mean loss over `n` training examples from their summed statistics;
        `kind` one of CURVATURES (module docstring)."""
        values, vectors = [], []
        for total, factors in zip(sums.blocks, sums.factors, strict=True):
            gn = total / n
            if not (torch.isfinite(gn).all() and torch.isfinite(factors.inputs).all()
                    and torch.isfinite(factors.outputs).all()):
                raise NumericalError("The projected curvature is not finite; check the model's loss for NaN/inf.")
            if kind == "gn":
                lam, q = sym_eigh(gn)
            else:
                _, q_in = sym_eigh(factors.inputs / max(factors.positions, 1.0))
                _, q_out = sym_eigh(factors.outputs.sum(0) / n)
                q = torch.kron(q_out, q_in)  # rows/columns in the (out, in) order of a flattened block
                lam = ((q.T @ gn) * q.T).sum(1)  # diag(Q^T G Q): EK-FAC's corrected eigenvalues
            values.append(lam.clamp_min(0.0))
            vectors.append(q)
        return ProjectedCurvature(tuple(len(v) for v in values), tuple(values), tuple(vectors))

    @property
    def mean_eigenvalue(self) -> float:
        """trace / D of the whole block-diagonal matrix."""
        return sum(v.sum().item() for v in self.values) / sum(self.blocks)

    def damping(self, damping: float | None, scale: float) -> float:
        """`damping`, or `scale` x the mean eigenvalue when None."""
        if damping is not None:
            return float(damping)
        mean = self.mean_eigenvalue
        if not mean > 0:
            raise NumericalError(
                f"Cannot choose a damping: the projected curvature has mean eigenvalue {mean}; pass damping=... ."
            )
        return scale * mean

    def inverse(self, damping: float, dtype: torch.dtype, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """(C_l + damping I)^-1 per block, [D_l, D_l] in `dtype` (symmetric)."""
        out = []
        for lam, q in zip(self.values, self.vectors, strict=True):
            out.append(((q / (lam + damping)) @ q.T).to(device=device, dtype=dtype))
        return out


def apply_blocks(rows: torch.Tensor, inverses: Sequence[torch.Tensor]) -> torch.Tensor:
    """rows [R, D] -> rows with each block multiplied by its (symmetric) inverse: [R, D]."""
    out, start = [], 0
    for inv in inverses:
        d = inv.shape[0]
        out.append(rows[:, start : start + d] @ inv)
        start += d
    return torch.cat(out, dim=1)
