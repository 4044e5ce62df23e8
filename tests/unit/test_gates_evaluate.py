"""`evaluate_gates` on a real SmallResNet trained briefly on digits (10% flipped labels):
a copy of the champion, a damaged candidate, a NaN-producing candidate, and the ONNX gate alone
(real export with the dynamo exporter, real onnxruntime, real Great Expectations)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from audit.demo.digits import NUM_CLASSES, load_digits_splits
from audit.demo.models import SmallResNet
from audit.errors import InvalidInput
from audit.gates import GateReport, GateThresholds, evaluate_gates
from audit.gates.onnx_parity import EXPORT_BATCH, onnx_parity_gate
from audit.training import TrainConfig, predict_logits, train

METRIC_KEYS = {
    "fix_rate", "heldout_accuracy_before", "heldout_accuracy_after", "max_class_recall_drop", "canary_flip_rate",
    "onnx_max_abs_diff",
}


@pytest.fixture(scope="module")
def setup():
    """Champion trained 15 epochs (~5 s on one core); flagged = its production mispredictions
    with the true labels as the reviewer's; canary = the whole production split."""
    torch.manual_seed(0)
    splits = load_digits_splits(noise_rate=0.1, seed=0)
    champion = SmallResNet()
    train(champion, splits.train.dataset(), TrainConfig(epochs=15, lr=1e-2))
    wrong = (predict_logits(champion, splits.production.inputs).argmax(dim=1) != splits.production.labels)
    flagged = splits.production.subset(wrong.nonzero().flatten().numpy())
    assert 10 <= len(flagged) <= 100, f"expected a few dozen champion errors, got {len(flagged)}"
    return champion, flagged, splits.validation, splits.production


def run(setup, candidate: nn.Module, path: Path, **overrides) -> GateReport:
    champion, flagged, heldout, canary = setup
    thresholds = GateThresholds(**overrides)
    return evaluate_gates(champion, candidate, flagged, heldout, canary, NUM_CLASSES, thresholds, path)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_copy_of_champion_passes_every_gate_but_the_fix_rate(setup, tmp_path):
    champion = setup[0]
    report = run(setup, copy.deepcopy(champion), tmp_path / "candidate.onnx", min_fix_rate=0.5)
    assert [r.name for r in report.failed] == ["fix_rate"] and not report.passed
    fix = report.failed[0]
    assert (fix.before, fix.after, fix.threshold) == (0.0, 0.0, 0.5)
    assert fix.reason.startswith("fix rate 0.00 (0 of ") and fix.reason.endswith("is below the required 0.50")
    assert [r.name for r in report.results] == [
        "fix_rate", "heldout_accuracy", "class_recall", "canary_flips", "onnx_parity", "evaluation_table",
    ]
    metrics = report.metrics()
    assert set(metrics) == METRIC_KEYS
    assert metrics["heldout_accuracy_before"] == metrics["heldout_accuracy_after"] > 0.8
    assert metrics["max_class_recall_drop"] == 0.0 and metrics["canary_flip_rate"] == 0.0
    assert 0.0 <= metrics["onnx_max_abs_diff"] < 1e-4
    assert "on a batch of 256 (exported with batch 2)" in report.result("onnx_parity").reason
    assert (tmp_path / "candidate.onnx").is_file()
    document = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert document["passed"] is False and document["failed"] == ["fix_rate"]
    assert document["thresholds"] == {
        "min_fix_rate": 0.5, "max_accuracy_drop_points": 0.5, "max_class_recall_drop_points": 2.0,
        "max_canary_flip_rate": 0.02, "onnx_rtol": 1e-3, "onnx_atol": 1e-4, "harm_resolution_examples": 1,
        "harm_significance": None,
    }
    assert len(document["results"]) == 6 and all(isinstance(r["reason"], str) for r in document["results"])


def test_same_object_passes_with_zero_fix_rate_and_is_left_untouched(setup, tmp_path):
    champion = setup[0]
    before = state(champion)
    champion.train()  # the gates must evaluate in eval mode and give the mode back
    try:
        report = run(setup, champion, tmp_path / "nested" / "same.onnx", min_fix_rate=0.0)
        assert champion.training
    finally:
        champion.eval()
    assert report.passed and report.failed == ()
    assert all(torch.equal(before[k], v) for k, v in champion.state_dict().items())
    assert (tmp_path / "nested" / "same.onnx").is_file()


def test_damaged_candidate_fails_accuracy_recall_and_canary_with_reasons(setup, tmp_path):
    damaged = copy.deepcopy(setup[0])
    with torch.no_grad():
        damaged.head.weight.zero_()  # logits = bias: one class for every input
    report = run(setup, damaged, tmp_path / "damaged.onnx", min_fix_rate=0.0)
    failed = {r.name: r for r in report.failed}
    assert set(failed) == {"heldout_accuracy", "class_recall", "canary_flips"}
    accuracy = failed["heldout_accuracy"]
    assert accuracy.after < 0.2 < 0.8 < accuracy.before and accuracy.threshold == pytest.approx(accuracy.before - 0.005)
    assert "is beyond the allowed drop of 0.50 points" in accuracy.reason
    assert failed["class_recall"].after > 50.0 and "more than the allowed 2.00" in failed["class_recall"].reason
    assert failed["canary_flips"].after > 0.5 and "more than the allowed 2.00%" in failed["canary_flips"].reason
    assert report.metrics()["max_class_recall_drop"] == failed["class_recall"].after


class NaNLogits(nn.Module):
    """Wraps a classifier and returns NaN for every logit."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * torch.tensor(math.nan)


def test_nan_logits_fail_the_evaluation_table(setup, tmp_path):
    report = run(setup, NaNLogits(copy.deepcopy(setup[0])), tmp_path / "nan.onnx", min_fix_rate=0.0)
    table = next(r for r in report.failed if r.name == "evaluation_table")
    assert table.after >= 5
    for name in ("not_be_null(logit_min)", "not_be_null(logit_max)", "not_be_null(prob_sum)"):
        assert f"expect_column_values_to_{name}" in table.reason
    # NaN never equals NaN, so parity fails too; its metric stays a number the flow can log.
    assert "onnx_parity" in {r.name for r in report.failed}
    assert math.isnan(report.metrics()["onnx_max_abs_diff"])


def test_onnx_export_has_a_dynamic_batch_and_matches_pytorch(setup, tmp_path):
    champion, _, heldout, _ = setup
    path = tmp_path / "model.onnx"
    # Only two rows available: the gate must still check a batch size other than the export's.
    result = onnx_parity_gate(champion, heldout.inputs[:2], path, rtol=1e-3, atol=1e-4)
    assert result.passed and result.metric == "onnx_max_abs_diff" and 0.0 <= result.after < 1e-4
    assert "on a batch of 3 (exported with batch 2)" in result.reason
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # one self-contained file
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for rows in (1, 7, 300):
        assert rows != EXPORT_BATCH
        out = session.run(None, {"inputs": heldout.inputs[:rows].numpy()})[0]
        assert out.shape == (rows, NUM_CLASSES)
        assert np.allclose(out, predict_logits(champion, heldout.inputs[:rows]).numpy(), rtol=1e-3, atol=1e-4)


class DataDependentBranch(nn.Module):
    """Python control flow on tensor values: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x.flatten(1))
        return y if y.sum() > 0 else -y


def test_export_failure_is_a_failed_gate_not_a_crash(setup, tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"stale export from an earlier run")
    result = onnx_parity_gate(DataDependentBranch(), setup[2].inputs, path, rtol=1e-3, atol=1e-4)
    assert not result.passed and math.isnan(result.after)
    assert result.reason.startswith("the model does not export to ONNX: TorchExportError: ")
    assert "(caused by " in result.reason and "\n" not in result.reason and "\x1b" not in result.reason
    assert not path.exists()  # the stale file must not pass for this model's export


def test_unusable_arguments_raise_one_sentence_errors(setup, tmp_path):
    champion, flagged, heldout, canary = setup
    with pytest.raises(InvalidInput, match="num_classes must be an integer >= 2"):
        evaluate_gates(champion, champion, flagged, heldout, canary, 1, GateThresholds(), tmp_path / "m.onnx")
    with pytest.raises(InvalidInput, match="The flagged table is empty"):
        evaluate_gates(champion, champion, flagged.subset([]), heldout, canary, NUM_CLASSES, GateThresholds(),
                       tmp_path / "m.onnx")
