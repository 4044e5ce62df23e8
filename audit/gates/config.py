"""Gate thresholds: the criteria a repaired model must meet before it is registered.

Saved next to the measured values in `gates.json`, so a reviewer sees why a version exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from audit.errors import InvalidInput


@dataclass(frozen=True)
class GateThresholds:
    """Pass criteria of `evaluate_gates`.

    min_fix_rate: fraction in [0, 1] of flagged examples the candidate must predict as the
        reviewer's label.
    max_accuracy_drop_points: largest allowed held-out accuracy drop vs the champion, in
        percentage points, in [0, 100].
    max_class_recall_drop_points: largest allowed recall drop of any class, in points, in [0, 100].
    max_canary_flip_rate: largest allowed fraction in [0, 1] of canary inputs (previously
        correct) whose prediction changes.
    onnx_rtol, onnx_atol: ONNX vs PyTorch logits must satisfy
        |onnx - torch| <= onnx_atol + onnx_rtol * |torch| element-wise (np.allclose); both >= 0.
    harm_resolution_examples: a held-out accuracy or class recall drop beyond its threshold
        fails only when more than this many examples were lost net (lost minus gained), integer
        >= 0. 1: no harm gate demands a finer change than one example, which its split cannot
        resolve; 0 is the plain threshold. Chosen by the error rates measured on digits
        (docs/correction.md, "Gate decisions").
    harm_significance: None, or in (0, 1): such a drop must also be significant harm, an exact
        one-sided McNemar test on the examples that changed (lost vs gained) giving p below it.
        Measured beside the default and not used by it (it accepted more harmful repairs).
    """

    min_fix_rate: float = 0.5
    max_accuracy_drop_points: float = 0.5
    max_class_recall_drop_points: float = 2.0
    max_canary_flip_rate: float = 0.02
    onnx_rtol: float = 1e-3
    onnx_atol: float = 1e-4
    harm_resolution_examples: int = 1
    harm_significance: float | None = None

    def __post_init__(self) -> None:
        bounds = {
            "min_fix_rate": (0.0, 1.0),
            "max_accuracy_drop_points": (0.0, 100.0),
            "max_class_recall_drop_points": (0.0, 100.0),
            "max_canary_flip_rate": (0.0, 1.0),
            "onnx_rtol": (0.0, math.inf),
            "onnx_atol": (0.0, math.inf),
        }
        # Collect every problem so one error tells the user all there is to fix.
        problems = []
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            in_range = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and low <= value <= high
            )
            if not in_range:
                allowed = f"a finite number >= {low:g}" if high == math.inf else f"a number in [{low:g}, {high:g}]"
                problems.append(f"{name} must be {allowed} but is {value!r}")
        resolution = self.harm_resolution_examples
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 0:
            problems.append(f"harm_resolution_examples must be an integer >= 0 but is {resolution!r}")
        alpha = self.harm_significance
        if alpha is not None and not (isinstance(alpha, float) and 0.0 < alpha < 1.0):
            problems.append(f"harm_significance must be None or a number in (0, 1) but is {alpha!r}")
        if problems:
            raise InvalidInput(f"Invalid gate thresholds: {'; '.join(problems)}.")
