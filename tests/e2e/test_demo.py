"""The demo end to end at its default settings (Prefect ephemeral server, MLflow sqlite store,
Great Expectations, onnxruntime), the registration path, promotion, and the CLI on bad input."""

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from audit.correction import CorrectionConfig, trusted_steps
from flows.cli import app
from flows.correct_flow import correct
from flows.demo import MODEL_NAME, run_demo, summary
from flows.settings import CorrectionSettings
from registry_hooks import audit_log

GATE_METRICS = {"fix_rate", "heldout_accuracy_before", "heldout_accuracy_after", "max_class_recall_drop",
                "canary_flip_rate", "onnx_max_abs_diff", "relabel_precision"}


@pytest.fixture(scope="module")
def demo_result(prefect_harness, tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo") / "workdir")


def _artifact_json(run_id, path):
    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))


def test_demo_logs_every_gate_and_registers_a_gated_challenger(demo_result):
    client = MlflowClient()
    correction = demo_result.correction
    metrics = client.get_run(correction.run_id).data.metrics
    assert GATE_METRICS <= set(metrics)
    gates = _artifact_json(correction.run_id, "correction/gates.json")
    assert {g["name"] for g in gates["results"]} == {"fix_rate", "heldout_accuracy", "class_recall", "canary_flips",
                                                      "onnx_parity", "evaluation_table"}
    assert all(g["passed"] == (g["name"] not in {f.name for f in correction.gates.failed}) for g in gates["results"])
    # issue 2: at its default settings the demo ends with a registered, gated challenger
    assert correction.gates.passed, correction.failure_reasons()
    challenger = client.get_model_version_by_alias(MODEL_NAME, "challenger")
    assert str(challenger.version) == correction.registered_version
    assert challenger.tags["audit.gates"] == "passed"
    assert metrics["fix_rate"] >= 0.5
    assert metrics["heldout_accuracy_after"] >= metrics["heldout_accuracy_before"] - 0.005
    text = summary(demo_result)
    assert "mlflow ui --backend-store-uri" in text
    assert f"registered version {correction.registered_version} as @challenger" in text


def test_demo_logs_the_audit_and_correction_artifacts(demo_result):
    client = MlflowClient()
    audit_files = {a.path for a in client.list_artifacts(demo_result.audit.run_id, "audit")}
    assert {"audit/report.html", "audit/influence.parquet", "audit/self_influence.parquet",
            "audit/correction_candidates.parquet", "audit/flagged_validation.json",
            "audit/influence_grid.png"} <= audit_files
    correction = demo_result.correction.run_id
    assert [a.path for a in client.list_artifacts(correction, "onnx")] == ["onnx/model.onnx"]
    assert {"correction/influence_horizon.png", "correction/influence_horizon.parquet", "correction/report.html",
            "correction/gates.json"} <= {a.path for a in client.list_artifacts(correction, "correction")}
    horizon = client.get_metric_history(correction, "horizon_pearson")
    assert sorted(m.step for m in horizon) == [1, 2, 4, 8, 16, 32]
    # the repair's steps per round are capped at the horizon the influence estimate holds for
    metrics = client.get_run(correction).data.metrics
    frame = audit_log.load_table(correction, "influence_horizon", artifact_dir="correction")
    assert metrics["step_budget"] == trusted_steps(frame, 0.5)
    params = client.get_run(correction).data.params
    assert int(params["correction.steps"]) == min(CorrectionConfig().steps, int(metrics["step_budget"]))
    report = mlflow.artifacts.load_text(f"runs:/{correction}/correction/report.html")
    assert "Influence horizon" in report and "data:image/png;base64," in report and "class_recall" in report
    tags = client.get_run(correction).data.tags
    assert tags["audit.kind"] == "correction" and tags["audit.audit_run_id"] == demo_result.audit.run_id


def test_a_repair_that_passes_every_gate_is_registered_with_lineage_and_can_be_promoted(demo_result):
    # A near-zero learning rate leaves the champion's predictions unchanged: every gate but the
    # fix rate holds by construction, and the fix-rate gate is set to 0 for this check.
    result = correct(CorrectionSettings(workdir=demo_result.workdir, min_fix_rate=0.0), demo_result.audit.run_id,
                     config=CorrectionConfig(lr=1e-9, steps=1, rounds=1))
    assert result.gates.passed, [g.reason for g in result.gates.failed]
    client = MlflowClient()
    challenger = client.get_model_version_by_alias(MODEL_NAME, "challenger")
    assert str(challenger.version) == result.registered_version
    assert challenger.tags == {"audit.source_version": demo_result.champion_version,
                               "audit.audit_run_id": demo_result.audit.run_id, "audit.gates": "passed"}
    from registry_hooks.lineage import recover_training_data
    from registry_hooks.model_io import resolve_version

    ref = resolve_version(MODEL_NAME, alias="challenger")
    assert len(recover_training_data(ref.run_id, ref.spec.input_shape).train) == demo_result.n_train

    out = CliRunner().invoke(app, ["promote", "--workdir", str(demo_result.workdir)])
    assert out.exit_code == 0, out.output
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == result.registered_version


def test_cli_bad_input_is_one_sentence_and_exit_2(demo_result, tmp_path):
    versions_before = len(MlflowClient().search_model_versions(f"name='{MODEL_NAME}'"))
    bad = tmp_path / "flagged.csv"
    bad.write_text("example_id,pixels,predicted_label,true_label\na,\"[1.0, 2.0]\",1,3\n")
    out = CliRunner().invoke(app, ["audit", "--workdir", str(demo_result.workdir), "--inbox", str(bad)])
    assert out.exit_code == 2
    errors = [line for line in out.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith("error: The flagged batch failed these checks: every `pixels` list holds 64 values.")
    assert len(MlflowClient().search_model_versions(f"name='{MODEL_NAME}'")) == versions_before
