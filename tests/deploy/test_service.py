"""The service's Prefect deployment (schedule, parameters), flow runs started by registry events
through the receiver, the pipeline's empty-inbox case, and the CLI's refusals."""

from __future__ import annotations

import json
import time
from functools import partial

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from deploy.service import ServiceSettings, audit_deployment, start_flow_run
from flows.settings import AuditSettings, CorrectionSettings, StoreSettings
from registry_hooks.webhooks import RECEIVER_PATH, receiver_app, signature

SECRET = "s3cret-for-tests"


def signed(data: dict, delivery_id: str) -> tuple[bytes, dict]:
    body = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "t", "data": data}).encode()
    timestamp = str(int(time.time()))
    return body, {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": timestamp,
                  "X-MLflow-Signature": signature(SECRET, delivery_id, timestamp, body),
                  "Content-Type": "application/json"}


def test_deployment_carries_the_schedule_and_the_flow_settings(prefect_harness, tmp_path):
    from prefect import get_client

    service = ServiceSettings(store=StoreSettings(workdir=tmp_path), audit=AuditSettings(method="graddot"),
                              correction=CorrectionSettings(), cron="*/15 * * * *")
    deployment_id = audit_deployment(service).apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
    assert [s.schedule.cron for s in stored.schedules] == ["*/15 * * * *"]
    assert stored.parameters == service.parameters()
    assert stored.parameters["audit_settings"]["method"] == "graddot"
    assert stored.parameters["store"]["workdir"] == str(tmp_path)
    # one audit of the inbox at a time (the inbox claim guards runs outside this deployment too)
    assert stored.global_concurrency_limit is not None and stored.global_concurrency_limit.limit == 1

    events_only = ServiceSettings(store=StoreSettings(workdir=tmp_path), cron=None)
    with get_client(sync_client=True) as client:
        assert client.read_deployment(audit_deployment(events_only).apply()).schedules == []


def test_alias_event_through_the_receiver_creates_one_flow_run_per_delivery(prefect_harness, tmp_path):
    from prefect import get_client

    service = ServiceSettings(store=StoreSettings(workdir=tmp_path),
                              audit=AuditSettings(model_name="digits-classifier"), cron=None)
    deployment_id = audit_deployment(service).apply()
    client = TestClient(receiver_app(SECRET, partial(start_flow_run, service), model_name="digits-classifier"))
    data = {"name": "digits-classifier", "alias": "champion", "version": "7"}

    body, headers = signed(data, "delivery-a")
    first = client.post(RECEIVER_PATH, content=body, headers=headers)
    assert first.status_code == 202
    body, headers = signed(data, "delivery-a")  # the same delivery again: this receiver has handled it
    assert client.post(RECEIVER_PATH, content=body, headers=headers).status_code == 409
    # ... and a restarted receiver, which has not, starts no second run: the delivery id is the run's key
    restarted = TestClient(receiver_app(SECRET, partial(start_flow_run, service), model_name="digits-classifier"))
    assert restarted.post(RECEIVER_PATH, content=body, headers=headers).json()["run"] == first.json()["run"]
    body, headers = signed(data, "delivery-b")
    second = client.post(RECEIVER_PATH, content=body, headers=headers).json()["run"]
    assert second != first.json()["run"]

    with get_client(sync_client=True) as prefect_client:
        run = prefect_client.read_flow_run(first.json()["run"])
    assert run.deployment_id == deployment_id
    assert run.state.is_scheduled()
    assert run.name == "digits-classifier v7 @champion"
    assert run.parameters["audit_settings"]["model_name"] == "digits-classifier"
    assert run.parameters["audit_settings"]["alias"] == "champion"


def test_pipeline_with_an_empty_inbox_ends_without_any_mlflow_run(prefect_harness, mlflow_store):
    from mlflow import MlflowClient

    from flows.pipeline import audit_and_correct
    from registry_hooks.store import tracking_uri

    (mlflow_store / "inbox").mkdir()
    result = audit_and_correct(StoreSettings(workdir=mlflow_store), AuditSettings(), CorrectionSettings())
    assert result is None
    client = MlflowClient(tracking_uri(mlflow_store))
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_service_settings_are_checked_at_the_boundary(tmp_path):
    with pytest.raises(ValidationError, match="unknown influence method"):
        ServiceSettings(audit={"method": "nope"})
    with pytest.raises(ValidationError):
        ServiceSettings(correction={"gates": {"min_fix_rate": 1.5}})
    with pytest.raises(ValidationError):
        ServiceSettings(port=0)
    with pytest.raises(ValidationError, match="'restore' or 'flag'"):
        ServiceSettings(guard="off")


def test_the_service_receiver_guards_champion_in_the_service_registry(mlflow_store):
    """receiver_server wires the guard to the store the service audits: an ungated move of
    champion there is undone and starts no run (so no Prefect API is needed here)."""
    from mlflow import MlflowClient

    from deploy.service import receiver_server
    from registry_hooks.registry import promote
    from registry_hooks.tags import VersionTags

    client = MlflowClient()
    client.create_registered_model("digits-classifier")
    experiment = client.get_experiment_by_name("model-audit").experiment_id
    versions = []
    for tags in (VersionTags("1", "a1").to_mlflow(), {}):
        run = client.create_run(experiment).info.run_id
        versions.append(str(client.create_model_version("digits-classifier", f"runs:/{run}/m", run, tags=tags).version))
    promote("digits-classifier", versions[0])
    client.set_registered_model_alias("digits-classifier", "champion", versions[1])

    service = ServiceSettings(store=StoreSettings(workdir=mlflow_store), cron=None)
    app = receiver_server(service, SECRET).config.app
    body, headers = signed({"name": "digits-classifier", "alias": "champion", "version": versions[1]}, "d-guard")
    answer = TestClient(app).post(RECEIVER_PATH, content=body, headers=headers)
    assert answer.status_code == 200 and answer.json()["status"] == "reverted"
    assert answer.json()["guard"]["restored_to"] == versions[0]
    assert str(client.get_model_version_by_alias("digits-classifier", "champion").version) == versions[0]


@pytest.mark.parametrize("command", [["serve"], ["register-webhook", "--tracking-uri", "http://127.0.0.1:1"]])
def test_cli_without_a_secret_says_so_and_exits_2(command, monkeypatch):
    from flows.cli import SECRET_ENV, app

    monkeypatch.delenv(SECRET_ENV, raising=False)
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2
    assert SECRET_ENV in result.output and result.output.count("\n") == 1
