"""Typed gate outcomes: one `GateResult` per gate, gathered in a `GateReport`.

The report is what the correction flow logs: `metrics()` as MLflow metrics and `to_dict()` as
`gates.json`, written before any registry call.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from audit.errors import InvalidInput
from audit.gates.config import GateThresholds

GATE_NAMES = ("fix_rate", "heldout_accuracy", "class_recall", "canary_flips", "onnx_parity", "evaluation_table")


@dataclass(frozen=True)
class GateResult:
    """One gate's measurement and verdict.

    `before` is the champion's value where that means something (else None), `after` the
    candidate's. `threshold` is in the same unit as `after`: for `fix_rate` and
    `heldout_accuracy` the gate needs after >= threshold, for the others after <= threshold
    (`onnx_parity` reports atol as threshold, its verdict is the full rtol/atol test).
    `reason` is one sentence a reviewer can read without the code.
    """

    name: str
    metric: str
    before: float | None
    after: float
    threshold: float
    passed: bool
    reason: str


@dataclass(frozen=True)
class GateReport:
    """Every gate's result, in evaluation order, and the thresholds used (None if unknown)."""

    results: tuple[GateResult, ...]
    thresholds: GateThresholds | None = None

    @property
    def passed(self) -> bool:
        """True when there is at least one gate and every gate passed."""
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def failed(self) -> tuple[GateResult, ...]:
        """The gates that did not pass, in evaluation order."""
        return tuple(r for r in self.results if not r.passed)

    def result(self, name: str) -> GateResult:
        """The result of gate `name` (one of GATE_NAMES)."""
        for r in self.results:
            if r.name == name:
                return r
        raise InvalidInput(f"The gate report has no gate named {name!r}; it has {[r.name for r in self.results]}.")

    def metrics(self) -> dict[str, float]:
        """MLflow metrics of the correction run: fix_rate, heldout_accuracy_before/_after
        (fractions in [0, 1]), max_class_recall_drop (points), canary_flip_rate (fraction),
        onnx_max_abs_diff (NaN when the export or the onnxruntime run failed); a gate that was
        not evaluated (the repair search's prediction-only reports) has no metric."""
        present = {r.name: r for r in self.results}
        metrics = {}
        if "fix_rate" in present:
            metrics["fix_rate"] = present["fix_rate"].after
        if "heldout_accuracy" in present:
            metrics["heldout_accuracy_before"] = float(present["heldout_accuracy"].before)
            metrics["heldout_accuracy_after"] = present["heldout_accuracy"].after
        for name, metric in (("class_recall", "max_class_recall_drop"), ("canary_flips", "canary_flip_rate"),
                             ("onnx_parity", "onnx_max_abs_diff")):
            if name in present:
                metrics[metric] = present[name].after
        return metrics

    def to_dict(self) -> dict:
        """Strict-JSON-serialisable form (`gates.json`): passed, failed gate names, thresholds,
        every result. Non-finite numbers become None, since JSON has no NaN."""
        return {
            "passed": self.passed,
            "failed": [r.name for r in self.failed],
            "thresholds": None if self.thresholds is None else asdict(self.thresholds),
            "results": [{k: _json_number(v) for k, v in asdict(r).items()} for r in self.results],
        }


def _json_number(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
