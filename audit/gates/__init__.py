"""Validation gates: whether a repaired model (candidate) may be registered beside the champion.

    from audit.gates import GateThresholds, evaluate_gates
    report = evaluate_gates(champion, candidate, flagged, heldout, canary, num_classes=10,
                            thresholds=GateThresholds(), onnx_path=Path("model.onnx"))
    report.passed, report.failed, report.metrics(), report.to_dict()

Modules: config (thresholds), metrics (prediction gates), onnx_parity (export + onnxruntime),
evaluation_table (Great Expectations suite), report (typed results), evaluate (the stage).
Great Expectations and onnxruntime are imported only when the gates run.
"""

from audit.gates.config import GateThresholds
from audit.gates.evaluate import evaluate_gates
from audit.gates.report import GateReport, GateResult

__all__ = ["GateReport", "GateResult", "GateThresholds", "evaluate_gates"]
