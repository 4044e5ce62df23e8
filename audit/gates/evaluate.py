"""Stage `evaluate_gates`: decide whether a repaired model (candidate) may replace the champion.

Runs every gate on the same inputs and returns a `GateReport`; it never raises because a gate
failed (only for unusable arguments), so the flow can log why a version was not registered.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from audit.errors import InvalidInput
from audit.examples import ExampleTable
from audit.gates.config import GateThresholds
from audit.gates.evaluation_table import evaluation_frame, evaluation_table_gate
from audit.gates.metrics import accuracy_gate, canary_gate, class_recall_gate, fix_rate_gate
from audit.gates.onnx_parity import onnx_parity_gate
from audit.gates.report import GateReport
from audit.training import predict_logits


def evaluate_prediction_gates(
    champion: nn.Module, candidate: nn.Module, flagged: ExampleTable, heldout: ExampleTable, canary: ExampleTable,
    num_classes: int, thresholds: GateThresholds,
) -> GateReport:
    """The gates that need only predictions: fix_rate, heldout_accuracy, class_recall and
    canary_flips, in that order (arguments as in `evaluate_gates`). The repair search compares
    candidates with these on its selection split."""
    return _evaluate(champion, candidate, flagged, heldout, canary, num_classes, thresholds, onnx_path=None)


def evaluate_gates(
    champion: nn.Module, candidate: nn.Module, flagged: ExampleTable, heldout: ExampleTable, canary: ExampleTable,
    num_classes: int, thresholds: GateThresholds, onnx_path: Path,
) -> GateReport:
    """Evaluate the candidate against the champion, gate by gate, in eval mode.

    flagged: the flagged batch with the reviewer's labels. heldout: the validation split logged
    with the model, disjoint from flagged. canary: a sample of inputs; only those the champion
    predicts correctly count. num_classes: the model's number of outputs (labels range(num_classes)).
    onnx_path: where the candidate's ONNX export is written (overwritten; absent if export fails).
    Both models may be the same object; neither is modified and their train/eval mode is kept.
    Gates: fix_rate, heldout_accuracy, class_recall, canary_flips, onnx_parity, evaluation_table.
    Raises InvalidInput for an empty table or num_classes < 2.
    """
    return _evaluate(champion, candidate, flagged, heldout, canary, num_classes, thresholds, Path(onnx_path))


def _evaluate(
    champion: nn.Module, candidate: nn.Module, flagged: ExampleTable, heldout: ExampleTable, canary: ExampleTable,
    num_classes: int, thresholds: GateThresholds, onnx_path: Path | None,
) -> GateReport:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidInput(f"num_classes must be an integer >= 2 (the model's output width); got {num_classes!r}.")
    for name, table in (("flagged", flagged), ("heldout", heldout), ("canary", canary)):
        if len(table) == 0:
            raise InvalidInput(f"The {name} table is empty; the gates need at least one {name} example.")

    def predictions(model: nn.Module) -> dict[str, torch.Tensor]:
        return {name: predict_logits(model, table.inputs) for name, table in tables.items()}  # [N, C] each

    tables = {"flagged": flagged, "heldout": heldout, "canary": canary}
    candidate_logits = predictions(candidate)
    champion_logits = candidate_logits if champion is candidate else predictions(champion)
    before = {name: out.argmax(dim=1) for name, out in champion_logits.items()}  # [N] each
    after = {name: out.argmax(dim=1) for name, out in candidate_logits.items()}

    t = thresholds
    results = (
        fix_rate_gate(before["flagged"], after["flagged"], flagged.labels, t.min_fix_rate),
        accuracy_gate(before["heldout"], after["heldout"], heldout.labels, t.max_accuracy_drop_points,
                      t.harm_significance, t.harm_resolution_examples),
        class_recall_gate(before["heldout"], after["heldout"], heldout.labels, num_classes,
                          t.max_class_recall_drop_points, t.harm_significance, t.harm_resolution_examples),
        canary_gate(before["canary"], after["canary"], canary.labels, t.max_canary_flip_rate),
    )
    if onnx_path is None:
        return GateReport(results, thresholds)
    results += (
        onnx_parity_gate(candidate, heldout.inputs, onnx_path, t.onnx_rtol, t.onnx_atol),
        evaluation_table_gate(
            evaluation_frame(
                {
                    "heldout": (heldout.ids, candidate_logits["heldout"], heldout.labels),
                    "flagged": (flagged.ids, candidate_logits["flagged"], flagged.labels),
                }
            ),
            num_classes,
        ),
    )
    return GateReport(results, thresholds)
