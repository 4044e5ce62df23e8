"""The demo end to end at its default settings (Prefect ephemeral server, MLflow sqlite store,
Great Expectations, onnxruntime), the registration path, promotion, and the CLI on bad input."""

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from audit.correction import CorrectionConfig, RepairCandidate, trusted_steps
from audit.errors import AlreadyCorrected
from flows.cli import app
from flows.correct_flow import correct
from flows.demo import MODEL_NAME, summary
from flows.settings import CorrectionSettings, GateSettings, StoreSettings
from registry_hooks import audit_log

# trains, audits and repairs the demo model (about a minute); xdist_group: with `make test`'s two
# workers, every reader of the session's demo run shares one worker, so the demo runs once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo")]

GATE_NAMES = {"fix_rate", "heldout_accuracy", "class_recall", "canary_flips", "onnx_parity", "evaluation_table"}
GATE_METRICS = {"fix_rate", "heldout_accuracy_before", "heldout_accuracy_after", "max_class_recall_drop",
                "canary_flip_rate", "onnx_max_abs_diff"}
# Outcomes by construction: lr 1e-9 changes no prediction (every gate but the fix rate holds, and
# the flagged digits, the champion's own mispredictions, stay wrong); a learning rate past
# float32's range (3.4e38) makes Adam's first step +-inf for every weight with a gradient, the last
# layer's bias included, so the outputs are not finite and the wreck's training diverges.
NO_OP = RepairCandidate("no-op", CorrectionConfig(lr=1e-9, steps=1, rounds=1))
WRECK = RepairCandidate("wreck", CorrectionConfig(lr=1e30, steps=10, rounds=1, reinforce_k=5))


@pytest.fixture
def demo_result(demo_run):
    """The session's demo, with MLflow pointed at its store."""
    from registry_hooks.store import use_store

    use_store(demo_run.workdir)
    return demo_run


def _artifact_json(run_id, path):
    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))


def _versions():
    return {str(v.version) for v in MlflowClient().search_model_versions(f"name='{MODEL_NAME}'")}


def _fresh_audit(demo_result) -> str:
    """Another audit of the demo's flagged batch (copied back into the inbox): one audit registers
    at most one version, so each constructed case gets its own."""
    import shutil

    from flows.audit_flow import audit
    from flows.settings import AuditSettings, StoreSettings

    workdir = demo_result.workdir
    for batch in (workdir / "processed" / demo_result.audit.run_id).iterdir():
        shutil.copy(batch, workdir / "inbox" / batch.name)
    store = StoreSettings(workdir=workdir, allow_pickle=True)
    return audit(store, AuditSettings(model_name=MODEL_NAME, method="graddot")).run_id


def test_demo_logs_every_candidate_and_gate_and_registers_only_a_gated_challenger(demo_result):
    """What the demo promises wherever it runs, whichever way this machine's training went."""
    client = MlflowClient()
    correction = demo_result.correction
    run = client.get_run(correction.run_id)
    candidates = audit_log.load_table(correction.run_id, "candidates", artifact_dir="correction")
    assert list(candidates["candidate"]) == list(CorrectionSettings().candidates)
    assert {"fix_rate_passed", "heldout_accuracy_passed", "class_recall_passed", "canary_flips_passed",
            "failed_because"} <= set(candidates.columns)
    assert list(candidates["passed"]) == [o.selection.passed for o in correction.search.outcomes]
    assert int(candidates["chosen"].sum()) == (correction.search.chosen is not None)
    assert run.data.metrics["candidates_tried"] == len(candidates)
    registered = correction.registered_version is not None
    assert run.data.tags["audit.gates"] == ("passed" if registered else "failed")
    text = summary(demo_result)
    assert "mlflow ui --backend-store-uri" in text
    if correction.gates is not None:  # a candidate passed selection and was gated on the other split
        gates = _artifact_json(correction.run_id, "correction/gates.json")
        assert {g["name"] for g in gates["results"]} == GATE_NAMES
        assert gates["passed"] == correction.gates.passed == registered
        assert GATE_METRICS <= set(run.data.metrics)
    else:
        assert not registered and "none passed the selection gates" in text
    if registered:
        challenger = client.get_model_version_by_alias(MODEL_NAME, "challenger")
        assert str(challenger.version) == correction.registered_version
        assert challenger.tags["audit.gates"] == "passed"
        assert run.data.metrics["fix_rate"] >= 0.5
        assert f"registered version {correction.registered_version} as @challenger" in text
    else:
        assert _versions() == {demo_result.champion_version}
        assert "Not registered: " in text and correction.failure_reasons()


def test_demo_logs_the_audit_and_correction_artifacts(demo_result):
    client = MlflowClient()
    audit_files = {a.path for a in client.list_artifacts(demo_result.audit.run_id, "audit")}
    assert {"audit/report.html", "audit/influence.parquet", "audit/self_influence.parquet",
            "audit/correction_candidates.parquet", "audit/flagged_validation.json",
            "audit/influence_grid.png"} <= audit_files
    correction = demo_result.correction.run_id
    assert {"correction/influence_horizon.png", "correction/influence_horizon.parquet", "correction/report.html",
            "correction/candidates.parquet"} <= {a.path for a in client.list_artifacts(correction, "correction")}
    if demo_result.correction.gates is not None:
        assert [a.path for a in client.list_artifacts(correction, "onnx")] == ["onnx/model.onnx"]
    horizon = client.get_metric_history(correction, "horizon_pearson")
    assert sorted(m.step for m in horizon) == [1, 2, 4, 8, 16, 32]
    # every candidate's steps per round are capped at the horizon the influence estimate holds for
    metrics = client.get_run(correction).data.metrics
    frame = audit_log.load_table(correction, "influence_horizon", artifact_dir="correction")
    assert metrics["step_budget"] == trusted_steps(frame, 0.5)
    candidates = audit_log.load_table(correction, "candidates", artifact_dir="correction")
    assert all(candidates["steps"] <= metrics["step_budget"])
    report = mlflow.artifacts.load_text(f"runs:/{correction}/correction/report.html")
    assert "Influence horizon" in report and "data:image/png;base64," in report and "Repair candidates" in report
    tags = client.get_run(correction).data.tags
    assert tags["audit.kind"] == "correction" and tags["audit.audit_run_id"] == demo_result.audit.run_id


def test_a_search_with_a_passing_candidate_registers_it_with_lineage_and_it_can_be_promoted(demo_result):
    # By construction: the wreck's training diverges; the no-op passes every gate once the
    # fix-rate gate asks for 0.
    audit_run_id = _fresh_audit(demo_result)
    store = StoreSettings(workdir=demo_result.workdir, allow_pickle=True)
    settings = CorrectionSettings(gates=GateSettings(min_fix_rate=0.0))
    # the no-op first: the influence horizon is measured with the first candidate's settings
    result = correct(store, settings, audit_run_id, candidates=(NO_OP, WRECK))
    assert [o.candidate.name for o in result.search.outcomes] == ["no-op", "wreck"]
    assert not result.search.outcomes[1].selection.passed and result.search.chosen.candidate.name == "no-op"
    assert result.gates.passed, result.failure_reasons()
    client = MlflowClient()
    challenger = client.get_model_version_by_alias(MODEL_NAME, "challenger")
    assert str(challenger.version) == result.registered_version
    assert challenger.tags == {"audit.source_version": demo_result.champion_version,
                               "audit.audit_run_id": audit_run_id, "audit.gates": "passed"}
    # one audit registers at most one version: a second correction reports the first
    before = _versions()
    with pytest.raises(AlreadyCorrected, match=f"version {result.registered_version} of {MODEL_NAME}"):
        correct(store, settings, audit_run_id, candidates=(NO_OP,))
    out = CliRunner().invoke(app, ["correct", audit_run_id, "--workdir", str(demo_result.workdir)])
    assert out.exit_code == 0 and f"already corrected: version {result.registered_version}" in out.output
    assert _versions() == before
    run = client.get_run(result.run_id)
    assert run.data.params["correction.candidate"] == "no-op" and run.data.tags["audit.gates"] == "passed"
    candidates = audit_log.load_table(result.run_id, "candidates", artifact_dir="correction")
    assert candidates.loc[1, "failed_because"].startswith("training diverged: ")
    assert not candidates.loc[1, "stable_training_passed"] and candidates.loc[0, "heldout_accuracy_passed"]
    report = mlflow.artifacts.load_text(f"runs:/{result.run_id}/correction/report.html")
    assert "Every gate passed: candidate no-op is registered as @challenger" in report
    assert f'<code class="next-command">model-audit promote --model {MODEL_NAME} --workdir' in report
    assert result.verdict.passed and result.verdict.next_command in report
    from registry_hooks.lineage import recover_training_data
    from registry_hooks.model_io import resolve_version

    ref = resolve_version(MODEL_NAME, alias="challenger")
    assert len(recover_training_data(ref.run_id, ref.spec).train) == demo_result.n_train

    out = CliRunner().invoke(app, ["promote", "--workdir", str(demo_result.workdir)])
    assert out.exit_code == 0, out.output
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == result.registered_version


def test_a_search_where_no_candidate_can_pass_registers_nothing_and_names_each_failure(demo_result):
    before = _versions()
    # By construction: doing nothing fixes none of the flagged mispredictions, and the wreck fails too.
    store = StoreSettings(workdir=demo_result.workdir, allow_pickle=True)
    result = correct(store, CorrectionSettings(gates=GateSettings(min_fix_rate=1.0)), _fresh_audit(demo_result),
                     candidates=(NO_OP, WRECK))
    assert result.registered_version is None and result.gates is None and result.search.chosen is None
    (reason,) = result.failure_reasons()
    assert reason.startswith("no repair candidate passed the gates on the selection split (no-op: fix rate 0.00")
    assert "| wreck: training diverged: " in reason
    assert _versions() == before
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["audit.gates"] == "failed" and run.data.params["correction.candidate"] == "none"
    report = mlflow.artifacts.load_text(f"runs:/{result.run_id}/correction/report.html")
    assert "Not registered: no repair candidate passed" in report and 'class="verdict failed"' in report


def test_cli_bad_input_is_one_sentence_and_exit_2(demo_result, tmp_path):
    versions_before = len(MlflowClient().search_model_versions(f"name='{MODEL_NAME}'"))
    bad = tmp_path / "flagged.csv"
    bad.write_text("example_id,pixels,predicted_label,true_label\na,\"[1.0, 2.0]\",1,3\n")
    out = CliRunner().invoke(app, ["audit", "--workdir", str(demo_result.workdir), "--inbox", str(bad),
                                   "--allow-pickle"])
    assert out.exit_code == 2
    errors = [line for line in out.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith("error: The flagged batch failed these checks: every `pixels` list holds 64 values.")
    assert len(MlflowClient().search_model_versions(f"name='{MODEL_NAME}'")) == versions_before
