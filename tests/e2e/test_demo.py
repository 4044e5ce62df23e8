"""The demo end to end at its default settings: Prefect ephemeral server, MLflow sqlite store,
Great Expectations, onnxruntime; then the CLI's handling of bad input."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from flows.demo import MODEL_NAME, run_demo, summary


@pytest.fixture(scope="module")
def demo_result(prefect_harness, tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo") / "workdir")


def test_demo_registers_a_gated_challenger(demo_result):
    client = MlflowClient()
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    challenger = client.get_model_version_by_alias(MODEL_NAME, "challenger")
    assert str(champion.version) == demo_result.champion_version
    assert str(challenger.version) == demo_result.correction.registered_version
    assert challenger.tags == {
        "audit.source_version": demo_result.champion_version,
        "audit.audit_run_id": demo_result.audit.run_id,
        "audit.gates": "passed",
    }
    metrics = client.get_run(demo_result.correction.run_id).data.metrics
    assert metrics["fix_rate"] >= 0.5
    assert metrics["heldout_accuracy_after"] >= metrics["heldout_accuracy_before"] - 0.005
    assert {"heldout_accuracy_before", "max_class_recall_drop", "canary_flip_rate", "onnx_max_abs_diff"} <= set(metrics)


def test_demo_logs_the_audit_and_correction_artifacts(demo_result):
    client = MlflowClient()
    audit_files = {a.path for a in client.list_artifacts(demo_result.audit.run_id, "audit")}
    assert {"audit/report.html", "audit/influence.parquet", "audit/correction_candidates.parquet"} <= audit_files
    correction = demo_result.correction.run_id
    assert {a.path for a in client.list_artifacts(correction, "correction")} >= {"correction/gates.json"}
    assert [a.path for a in client.list_artifacts(correction, "onnx")] == ["onnx/model.onnx"]
    tags = client.get_run(correction).data.tags
    assert tags["audit.kind"] == "correction" and tags["audit.audit_run_id"] == demo_result.audit.run_id
    text = summary(demo_result)
    assert "registered version" in text and "mlflow ui --backend-store-uri" in text


def test_the_challenger_keeps_lineage_so_it_can_be_audited_in_turn(demo_result):
    from registry_hooks.lineage import recover_training_data
    from registry_hooks.model_io import resolve_version

    ref = resolve_version(MODEL_NAME, alias="challenger")
    data = recover_training_data(ref.run_id, ref.spec.input_shape)
    assert len(data.train) == demo_result.n_train


def test_cli_bad_input_is_one_sentence_and_exit_2(demo_result, tmp_path):
    bad = tmp_path / "flagged.csv"
    bad.write_text("example_id,pixels,predicted_label,true_label\na,\"[1.0, 2.0]\",1,3\n")
    out = CliRunner().invoke(app, ["audit", "--workdir", str(demo_result.workdir), "--inbox", str(bad)])
    assert out.exit_code == 2
    errors = [line for line in out.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith("error: The flagged batch failed these checks: every `pixels` list holds 64 values.")
    assert len(MlflowClient().search_model_versions(f"name='{MODEL_NAME}'")) == 2
    mlflow.set_tracking_uri("")  # the CLI pointed MLflow at the demo store; leave nothing behind
