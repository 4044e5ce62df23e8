"""Refusals before any work: a correction of an audit that never finished, and CLI commands
pointed at a workdir that does not exist."""

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from audit.errors import AuditError
from flows.cli import app
from flows.correct_flow import load_audit
from registry_hooks.tags import RunTags


def test_correct_refuses_an_audit_run_that_did_not_finish(mlflow_store):
    client = MlflowClient()
    experiment = client.get_experiment_by_name("model-audit").experiment_id
    # an audit that died after it started logging is left RUNNING (or marked FAILED)
    tags = RunTags("digits-classifier", "1", "audit", "sha256:0").to_mlflow()
    running = client.create_run(experiment, tags=tags).info.run_id
    with pytest.raises(AuditError, match=f"Audit run {running} is RUNNING, not FINISHED"):
        load_audit.fn(running)
    client.set_terminated(running, status="FAILED")
    with pytest.raises(AuditError, match="is FAILED, not FINISHED"):
        load_audit.fn(running)


@pytest.mark.parametrize("command", [["audit"], ["correct", "some-run-id"], ["promote"]])
def test_commands_refuse_a_workdir_that_does_not_exist_and_create_nothing(command, tmp_path):
    missing = tmp_path / "typo-workdir"
    result = CliRunner().invoke(app, [*command, "--workdir", str(missing)])
    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert not missing.exists()


def test_promote_force_needs_a_reason(mlflow_store):
    result = CliRunner().invoke(app, ["promote", "--workdir", str(mlflow_store), "--force"])
    assert result.exit_code == 2 and "error: --force needs --reason" in result.output


@pytest.mark.parametrize("method, why", [("tracin", "needs training checkpoints"),
                                         ("gradcos", "has no self-influence"), ("nope", "unknown influence method")])
def test_audit_settings_refuse_methods_the_audit_flow_cannot_run(method, why):
    from pydantic import ValidationError

    from flows.settings import AUDIT_METHODS, AuditSettings

    with pytest.raises(ValidationError, match=why):
        AuditSettings(method=method)
    assert method not in AUDIT_METHODS and all(AuditSettings(method=m).method == m for m in AUDIT_METHODS)


def test_the_cli_offers_exactly_the_runnable_methods():
    from flows.settings import AUDIT_METHODS

    result = CliRunner().invoke(app, ["audit", "--help"], env={"COLUMNS": "240"})
    assert f"Influence method ({', '.join(AUDIT_METHODS)})." in " ".join(result.output.split())
