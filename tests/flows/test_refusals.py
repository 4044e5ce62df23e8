"""Refusals before any work: a correction of an audit that never finished, CLI commands pointed at
a workdir that does not exist, a pickled model loaded without the opt-in, and flagged batches
beyond the audit's bounds (too many rows, pixels outside the model's training range)."""

import json

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
        load_audit.fn(running, True)
    client.set_terminated(running, status="FAILED")
    with pytest.raises(AuditError, match="is FAILED, not FINISHED"):
        load_audit.fn(running, True)


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


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


def _runs(workdir) -> list:
    from registry_hooks.store import tracking_uri

    client = MlflowClient(tracking_uri(workdir))
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_pickled_model_without_the_opt_in_is_refused_and_the_batch_stays_in_the_inbox(
        prefect_harness, small_champion, monkeypatch):
    from audit.flagged import write_batch
    from registry_hooks.model_io import ALLOW_PICKLE_ENV

    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    workdir, frame = small_champion
    batch = write_batch(frame, workdir / "inbox" / "batch.parquet")
    runs_before = len(_runs(workdir))
    result = CliRunner().invoke(app, ["audit", "--workdir", str(workdir), "--model", "m", "--method", "graddot"])
    assert result.exit_code == 2
    (error,) = _error_lines(result.output)
    assert error.startswith("error: Version 1 of m is a pickled model")
    assert "--allow-pickle" in error and f"{ALLOW_PICKLE_ENV}=1" in error and error.count(". ") == 0
    # refused before the claim: nothing logged, nothing quarantined, the batch where the user left it
    assert len(_runs(workdir)) == runs_before
    assert batch.exists() and not (workdir / "quarantine").exists()
    assert not any((workdir / "claims").glob("*/*"))


def test_the_opt_in_by_variable_or_by_flag_loads_the_model_and_correct_needs_it_too(
        prefect_harness, small_champion, monkeypatch, tmp_path):
    from audit.flagged import write_batch
    from registry_hooks.model_io import ALLOW_PICKLE_ENV
    from registry_hooks.store import tracking_uri

    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    workdir, frame = small_champion
    write_batch(frame, workdir / "inbox" / "batch.parquet")
    by_variable = CliRunner().invoke(app, ["audit", "--workdir", str(workdir), "--model", "m", "--method", "graddot"],
                                     env={ALLOW_PICKLE_ENV: "1"})
    assert by_variable.exit_code == 0, by_variable.output
    audit_run_id = by_variable.output.split("audit run ")[1].split(":")[0]

    # correct loads the same model: refused without the opt-in, before any correction run
    refused = CliRunner().invoke(app, ["correct", audit_run_id, "--workdir", str(workdir)])
    assert refused.exit_code == 2
    (error,) = _error_lines(refused.output)
    assert "--allow-pickle" in error and ALLOW_PICKLE_ENV in error
    client = MlflowClient(tracking_uri(workdir))
    assert not [r for r in _runs(workdir) if r.data.tags.get("audit.kind") == "correction"]
    assert len(client.search_model_versions("name='m'")) == 1

    # by flag, against the store named by --tracking-uri (the workdir holds only this run's inbox)
    elsewhere = tmp_path / "elsewhere"
    write_batch(frame.iloc[:2], elsewhere / "inbox" / "batch.parquet")
    by_flag = CliRunner().invoke(app, ["audit", "--workdir", str(elsewhere), "--tracking-uri", tracking_uri(workdir),
                                       "--allow-pickle", "--model", "m", "--method", "graddot"])
    assert by_flag.exit_code == 0, by_flag.output
    run_id = by_flag.output.split("audit run ")[1].split(":")[0]
    assert client.get_run(run_id).data.tags["audit.kind"] == "audit"
    assert not (elsewhere / "mlflow.db").exists() and (elsewhere / "processed" / run_id / "batch.parquet").exists()


def test_a_batch_over_max_flagged_is_refused_in_one_sentence_and_quarantined(prefect_harness, small_champion):
    from audit.flagged import write_batch

    workdir, frame = small_champion
    write_batch(frame, workdir / "inbox" / "batch.parquet")
    runs_before = len(_runs(workdir))
    result = CliRunner().invoke(app, ["audit", "--workdir", str(workdir), "--model", "m", "--allow-pickle",
                                      "--max-flagged", "3"])
    assert result.exit_code == 2
    (error,) = _error_lines(result.output)  # counted before the batch is loaded
    assert error.startswith("error: The flagged batch has 4 rows, more than the 3 an audit takes (`max_flagged`); "
                            "split it into smaller batches. The batch was moved to ")
    assert len(_runs(workdir)) == runs_before
    (quarantined,) = (workdir / "quarantine").iterdir()
    assert (quarantined / "batch.parquet").exists() and not any((workdir / "inbox").iterdir())
    assert json.loads((quarantined / "flagged_validation.json").read_text())["success"] is False


def test_pixels_outside_the_training_range_are_refused_naming_the_range_and_the_rows(prefect_harness, small_champion):
    from audit.errors import InvalidFlaggedBatch
    from audit.flagged import write_batch
    from flows.audit_flow import audit
    from flows.settings import AuditSettings, StoreSettings
    from registry_hooks.model_io import resolve_version

    workdir, frame = small_champion
    low, high = resolve_version("m", alias="champion").spec.input_range
    assert (low, high) == (0.0, 16.0)  # digits: what the training data held
    frame.at[0, "pixels"] = [high * 4] * 64  # e.g. 0-255 pixels sent to a model trained on 0-16
    frame.at[2, "pixels"] = [low - 1.0] + list(frame.at[2, "pixels"][1:])
    write_batch(frame, workdir / "inbox" / "batch.parquet")
    runs_before = len(_runs(workdir))
    with pytest.raises(InvalidFlaggedBatch, match=r"every `pixels` value within the model's training range "
                                                  r"\[0, 16\]: 2 rows outside\. The batch was moved to"):
        audit(StoreSettings(workdir=workdir, allow_pickle=True), AuditSettings(model_name="m", method="graddot"))
    assert len(_runs(workdir)) == runs_before
    (quarantined,) = (workdir / "quarantine").iterdir()
    assert (quarantined / "batch.parquet").exists()
    outcome = json.loads((quarantined / "flagged_validation.json").read_text())
    assert outcome["success"] is False


def test_an_mlflow_server_that_does_not_answer_is_one_sentence_and_exit_2(tmp_path, monkeypatch):
    import socket

    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client's own retries, spent at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    out = CliRunner().invoke(app, ["audit", "--workdir", str(tmp_path), "--tracking-uri", f"http://127.0.0.1:{port}"])
    assert out.exit_code == 2, out.output
    errors = [line for line in out.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: MLflow failed: ") and str(port) in errors[0]
    assert "Traceback" not in out.output
