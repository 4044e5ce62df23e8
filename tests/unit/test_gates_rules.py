"""Gate rules without a model: thresholds validation, prediction gates on hand-made labels,
the report's metrics and JSON form, and the Great Expectations suite on hand-made tables."""

from __future__ import annotations

import json
import math

import pytest
import torch

from audit.errors import InvalidInput
from audit.gates import GateReport, GateResult, GateThresholds
from audit.gates.evaluation_table import evaluation_frame, evaluation_table_gate
from audit.gates.metrics import accuracy_gate, canary_gate, class_recall_gate, fix_rate_gate, mcnemar_harm_p


def t(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_default_thresholds_match_the_issue():
    th = GateThresholds()
    assert (th.min_fix_rate, th.max_accuracy_drop_points, th.max_class_recall_drop_points) == (0.5, 0.5, 2.0)
    assert (th.max_canary_flip_rate, th.onnx_rtol, th.onnx_atol) == (0.02, 1e-3, 1e-4)
    assert (th.harm_resolution_examples, th.harm_significance) == (1, None)


def test_thresholds_report_every_problem_in_one_error():
    with pytest.raises(InvalidInput) as caught:
        GateThresholds(min_fix_rate=1.5, max_canary_flip_rate=-0.1, onnx_atol=math.nan)
    message = str(caught.value)
    assert "min_fix_rate must be a number in [0, 1] but is 1.5" in message
    assert "max_canary_flip_rate" in message and "onnx_atol" in message
    assert message.count(".") <= 3  # one sentence (decimal points aside)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_accuracy_drop_points", 101.0),
        ("max_class_recall_drop_points", -1.0),
        ("onnx_rtol", -1e-3),
        ("onnx_atol", math.inf),
        ("min_fix_rate", True),
        ("min_fix_rate", "0.5"),
        ("harm_resolution_examples", -1),
        ("harm_resolution_examples", 1.5),
        ("harm_significance", 0.0),
        ("harm_significance", 1.0),
    ],
)
def test_thresholds_reject_out_of_range_values(field, value):
    with pytest.raises(InvalidInput, match=field):
        GateThresholds(**{field: value})


def test_fix_rate_counts_reviewer_labels_and_compares_with_threshold():
    reviewer = t([1, 2, 3, 4])
    champion = t([0, 0, 0, 0])
    candidate = t([1, 2, 0, 0])
    result = fix_rate_gate(champion, candidate, reviewer, min_fix_rate=0.6)
    assert (result.before, result.after, result.passed) == (0.0, 0.5, False)
    assert result.reason == (
        "fix rate 0.50 (2 of 4 flagged examples now predicted as the reviewer's label, champion 0.00) "
        "is below the required 0.60"
    )
    assert fix_rate_gate(champion, candidate, reviewer, min_fix_rate=0.5).passed


def test_accuracy_drop_exactly_at_the_limit_passes_and_beyond_fails():
    labels = t([0] * 200)
    champion = t([0] * 200)
    one_wrong = t([0] * 199 + [1])  # -0.5 points
    two_wrong = t([0] * 198 + [1, 1])  # -1.0 point
    at_limit = accuracy_gate(champion, one_wrong, labels, max_drop_points=0.5)
    assert at_limit.passed and at_limit.before == 1.0 and at_limit.after == pytest.approx(0.995)
    assert at_limit.threshold == pytest.approx(0.995)
    beyond = accuracy_gate(champion, two_wrong, labels, max_drop_points=0.5)
    assert not beyond.passed
    assert "-1.00 points" in beyond.reason and "beyond the allowed drop of 0.50 points" in beyond.reason


def test_class_recall_takes_the_worst_class_and_names_absent_ones():
    labels = t([0, 0, 0, 0, 1, 1, 1, 1])
    champion = t([0, 0, 0, 0, 1, 1, 1, 1])
    candidate = t([0, 0, 0, 1, 1, 1, 1, 1])  # class 0 recall 100% -> 75%, class 1 unchanged
    result = class_recall_gate(champion, candidate, labels, num_classes=3, max_drop_points=2.0)
    assert result.after == pytest.approx(25.0) and not result.passed
    assert "class 0: 100.0% -> 75.0%" in result.reason
    assert "classes [2] are absent from the held-out split" in result.reason
    improved = class_recall_gate(candidate, champion, labels, num_classes=2, max_drop_points=2.0)
    assert improved.passed and improved.after == pytest.approx(0.0) and "absent" not in improved.reason


def test_mcnemar_harm_p_is_the_binomial_tail_of_the_losses():
    assert mcnemar_harm_p(0, 0) == 1.0
    assert mcnemar_harm_p(1, 0) == 0.5
    assert mcnemar_harm_p(3, 0) == 0.125
    assert mcnemar_harm_p(4, 1) == pytest.approx(6 / 32)  # P(X >= 4), X ~ Bin(5, 1/2)
    assert mcnemar_harm_p(0, 5) == 1.0
    assert mcnemar_harm_p(3, 2) == pytest.approx(16 / 32)


def _class_of_40(lost: int, gained: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """40 examples of class 0 (plus 40 untouched of class 1): the candidate loses `lost` the
    champion had right and gains `gained` it had wrong."""
    labels = t([0] * 40 + [1] * 40)
    champion = t([0] * 30 + [1] * 10 + [1] * 40)  # 30 right, 10 wrong in class 0
    candidate = champion.clone()
    candidate[:lost] = 1
    candidate[30:30 + gained] = 0
    return champion, candidate, labels


def test_class_recall_with_significance_fails_only_on_evidence_of_harm():
    # one lost example of 40 is 2.5 points: beyond 2 points, but no evidence (p = 0.5)
    champion, candidate, labels = _class_of_40(lost=1, gained=0)
    plain = class_recall_gate(champion, candidate, labels, 2, 2.0)
    tested = class_recall_gate(champion, candidate, labels, 2, 2.0, significance=0.2)
    assert not plain.passed and tested.passed
    assert tested.after == pytest.approx(2.5) == plain.after
    assert tested.reason.endswith("1 lost, 0 gained, McNemar p=0.5 >= 0.2), more than the allowed 2.00 but not "
                                  "counted as harm")
    # three lost, none gained: 7.5 points and p = 0.125 < 0.2 -> fails with both rules
    champion, candidate, labels = _class_of_40(lost=3, gained=0)
    tested = class_recall_gate(champion, candidate, labels, 2, 2.0, significance=0.2)
    assert not tested.passed and "3 lost, 0 gained, McNemar p=0.12 < 0.2), more than the allowed 2.00" in tested.reason
    # the same three at p < 0.05 are not significant: the level decides, the threshold still applies
    assert class_recall_gate(champion, candidate, labels, 2, 2.0, significance=0.05).passed
    # within the threshold passes whatever the test says
    champion, candidate, labels = _class_of_40(lost=2, gained=2)
    assert class_recall_gate(champion, candidate, labels, 2, 2.0, significance=0.2).passed


def test_class_recall_with_a_resolution_of_one_example_never_fails_on_a_single_loss():
    # 1 of 40 lost is 2.5 points: beyond 2 points, but finer than this split can resolve
    champion, candidate, labels = _class_of_40(lost=1, gained=0)
    one = class_recall_gate(champion, candidate, labels, 2, 2.0, resolution=1)
    assert one.passed and "not more than 1 lost net), more than the allowed 2.00 but not counted as harm" in one.reason
    # two lost net (5 points) is more than one example: fails, as with the plain threshold
    champion, candidate, labels = _class_of_40(lost=3, gained=1)
    two = class_recall_gate(champion, candidate, labels, 2, 2.0, resolution=1)
    assert not two.passed and "3 lost, 1 gained, more than 1 lost net), more than the allowed 2.00" in two.reason
    assert not class_recall_gate(champion, candidate, labels, 2, 2.0).passed


def test_accuracy_with_significance_needs_a_drop_and_evidence():
    labels = t([0] * 200)
    champion = t([0] * 200)
    three_lost = t([0] * 197 + [1] * 3)  # -1.5 points, p = 0.125
    assert not accuracy_gate(champion, three_lost, labels, 0.5).passed
    assert not accuracy_gate(champion, three_lost, labels, 0.5, significance=0.2).passed
    passed = accuracy_gate(champion, three_lost, labels, 0.5, significance=0.1)
    assert passed.passed and "3 lost, 0 gained, McNemar p=0.12 >= 0.1" in passed.reason
    assert passed.reason.endswith("is beyond the allowed drop of 0.50 points but not counted as harm")
    # one example lost net of 200 is 0.5 points; two are beyond, and beyond one example
    two_lost = t([0] * 198 + [1] * 2)
    assert not accuracy_gate(champion, two_lost, labels, 0.4, resolution=1).passed
    assert accuracy_gate(champion, t([0] * 199 + [1]), labels, 0.4, resolution=1).passed


def test_canary_counts_only_inputs_the_champion_got_right():
    labels = t([0, 1, 2, 3])
    champion = t([0, 1, 2, 0])  # the last canary row is wrong for the champion: not counted
    candidate = t([0, 1, 0, 1])
    result = canary_gate(champion, candidate, labels, max_flip_rate=0.02)
    assert result.after == pytest.approx(1 / 3) and not result.passed
    assert result.reason.startswith("1 of 3 canary inputs the champion predicts correctly changed prediction")
    unmeasurable = canary_gate(t([1, 0]), t([1, 0]), t([0, 1]), max_flip_rate=0.02)
    assert not unmeasurable.passed and math.isnan(unmeasurable.after) and "none of the 2 canary" in unmeasurable.reason


def _report(onnx_diff: float) -> GateReport:
    def result(name, metric, before, after, passed=True):
        return GateResult(name, metric, before, after, 0.0, passed, f"{name} reason")

    return GateReport(
        (
            result("fix_rate", "fix_rate", 0.0, 0.7),
            result("heldout_accuracy", "heldout_accuracy", 0.95, 0.96),
            result("class_recall", "max_class_recall_drop", None, 1.5),
            result("canary_flips", "canary_flip_rate", None, 0.01),
            result("onnx_parity", "onnx_max_abs_diff", None, onnx_diff, passed=math.isfinite(onnx_diff)),
            result("evaluation_table", "evaluation_table_failed_expectations", None, 0.0),
        ),
        GateThresholds(),
    )


def test_report_metrics_and_json_form():
    report = _report(2e-7)
    assert report.passed and report.failed == ()
    assert report.metrics() == {
        "fix_rate": 0.7,
        "heldout_accuracy_before": 0.95,
        "heldout_accuracy_after": 0.96,
        "max_class_recall_drop": 1.5,
        "canary_flip_rate": 0.01,
        "onnx_max_abs_diff": 2e-7,
    }
    failing = _report(math.nan)
    assert not failing.passed and [r.name for r in failing.failed] == ["onnx_parity"]
    document = json.loads(json.dumps(failing.to_dict(), allow_nan=False))
    assert document["failed"] == ["onnx_parity"] and document["thresholds"]["min_fix_rate"] == 0.5
    assert document["results"][4]["after"] is None and document["results"][0]["reason"] == "fix_rate reason"
    with pytest.raises(InvalidInput, match="no gate named"):
        GateReport(()).result("onnx_parity")
    # a prediction-only report (the repair search's) has metrics for the gates it ran, no others
    prediction_only = GateReport(report.results[:4], GateThresholds())
    assert set(prediction_only.metrics()) == set(report.metrics()) - {"onnx_max_abs_diff"}
    assert GateReport(()).metrics() == {} and not GateReport(()).passed


def _frame(logits: torch.Tensor, labels: list[int]):
    ids = tuple(f"x{i}" for i in range(len(labels)))
    return evaluation_frame({"heldout": (ids, logits, t(labels))})


def test_evaluation_table_passes_for_sane_outputs():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 30.0]])
    frame = _frame(logits, [0, 2])
    assert list(frame["predicted_label"]) == [0, 2] and frame["prob_sum"].tolist() == pytest.approx([1.0, 1.0])
    result = evaluation_table_gate(frame, num_classes=3)
    assert result.passed and result.after == 0.0 and result.reason.startswith("all 15 expectations hold on 2 rows")


def test_evaluation_table_names_failed_expectations():
    logits = torch.tensor([[2.0, math.nan, 0.5], [0.0, math.inf, 1.0], [0.0, 1.0, 2.0]])
    result = evaluation_table_gate(_frame(logits, [0, 1, 7]), num_classes=3)
    assert not result.passed and result.after >= 3
    assert "expect_column_values_to_not_be_null(logit_min) [logits are not NaN: 1 rows]" in result.reason
    assert "expect_column_values_to_be_between(logit_max) [logits are finite: 1 rows]" in result.reason
    assert "expect_column_values_to_be_in_set(true_label) [labels are in the label set: 1 rows]" in result.reason


def test_evaluation_table_catches_a_head_of_the_wrong_width():
    logits = torch.zeros(4, 5)  # 5 outputs for a 3-class label set
    logits[:, 4] = 1.0
    result = evaluation_table_gate(_frame(logits, [0, 1, 2, 0]), num_classes=3)
    assert not result.passed
    assert "expect_column_values_to_be_in_set(num_logits)" in result.reason
    assert "expect_column_values_to_be_in_set(predicted_label)" in result.reason


def test_importing_the_gates_keeps_heavy_libraries_out():
    import subprocess
    import sys

    code = (
        "import sys, audit.gates; "
        "print(sorted(m for m in ('great_expectations', 'onnxruntime', 'onnx', 'mlflow', 'prefect') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
