"""The MLflow webhook receiver: signature and age checks, the events it acts on, and a real
`mlflow server` delivering an alias change to it over HTTP."""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest
from fastapi.testclient import TestClient

from registry_hooks.webhooks import (
    MAX_BODY_BYTES,
    RECEIVER_PATH,
    InvalidDelivery,
    RegistryEvent,
    parse_event,
    receiver_app,
    register_webhook,
    signature,
    verify_delivery,
)
from tests.deploy.conftest import free_port, wait_until

SECRET = "s3cret-for-tests"


def delivery(entity: str, action: str, data: dict, secret: str = SECRET, age_s: float = 0.0) -> tuple[bytes, dict]:
    body = json.dumps({"entity": entity, "action": action, "timestamp": "2026-11-28T00:00:00Z",
                       "data": data}).encode()
    timestamp = str(int(time.time() - age_s))
    headers = {"X-MLflow-Delivery-Id": "d-1", "X-MLflow-Timestamp": timestamp,
               "X-MLflow-Signature": signature(secret, "d-1", timestamp, body), "Content-Type": "application/json"}
    return body, headers


@pytest.fixture
def receiver():
    started: list[RegistryEvent] = []
    app = receiver_app(SECRET, lambda event: started.append(event) or f"run-{len(started)}",
                       alias="champion", model_name="digits-classifier")
    return TestClient(app), started


def test_watched_alias_event_starts_work_and_answers_202(receiver):
    client, started = receiver
    body, headers = delivery("model_version_alias", "created",
                             {"name": "digits-classifier", "alias": "champion", "version": "3"})
    response = client.post(RECEIVER_PATH, content=body, headers=headers)
    assert response.status_code == 202
    assert response.json()["run"] == "run-1"
    assert started == [RegistryEvent("model_version_alias", "created", "digits-classifier", "3", "champion", "d-1")]


@pytest.mark.parametrize("entity,action,data", [
    ("model_version_alias", "created", {"name": "digits-classifier", "alias": "challenger", "version": "4"}),
    ("model_version_alias", "created", {"name": "other-model", "alias": "champion", "version": "1"}),
    ("model_version", "created", {"name": "digits-classifier", "version": "5", "source": "models:/x"}),
])
def test_other_registry_events_are_ignored(receiver, entity, action, data):
    client, started = receiver
    body, headers = delivery(entity, action, data)
    response = client.post(RECEIVER_PATH, content=body, headers=headers)
    assert response.status_code == 200 and response.json()["status"] == "ignored"
    assert started == []


@pytest.mark.parametrize("tamper", ["wrong secret", "stale", "no signature", "body changed"])
def test_unverified_deliveries_are_refused_with_401(receiver, tamper):
    client, started = receiver
    data = {"name": "digits-classifier", "alias": "champion", "version": "3"}
    body, headers = delivery("model_version_alias", "created", data,
                             secret="not-the-secret" if tamper == "wrong secret" else SECRET,
                             age_s=3600 if tamper == "stale" else 0)
    if tamper == "no signature":
        del headers["X-MLflow-Signature"]
    if tamper == "body changed":
        body = body.replace(b'"3"', b'"4"')
    response = client.post(RECEIVER_PATH, content=body, headers=headers)
    assert response.status_code == 401
    assert started == []


def test_verified_but_malformed_body_is_a_400(receiver):
    client, started = receiver
    body = b'{"entity": "model_version_alias"}'
    headers = {"X-MLflow-Delivery-Id": "d-2", "X-MLflow-Timestamp": str(int(time.time())),
               "Content-Type": "application/json"}
    headers["X-MLflow-Signature"] = signature(SECRET, "d-2", headers["X-MLflow-Timestamp"], body)
    assert client.post(RECEIVER_PATH, content=body, headers=headers).status_code == 400
    assert started == []
    with pytest.raises(InvalidDelivery):
        parse_event(b"not json", "d-3")
    with pytest.raises(InvalidDelivery, match="secret"):
        verify_delivery(SECRET, {}, body)


def _signed(body: bytes, delivery_id: str = "d-9") -> dict:
    timestamp = str(int(time.time()))
    return {"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": timestamp,
            "X-MLflow-Signature": signature(SECRET, delivery_id, timestamp, body), "Content-Type": "application/json"}


def test_hostile_deliveries_get_a_4xx_never_a_500(receiver):
    client, started = receiver
    body, headers = delivery("model_version_alias", "created",
                             {"name": "digits-classifier", "alias": "champion", "version": "3"})
    # a non-ASCII signature is malformed, not a server error
    non_ascii = dict(headers, **{"X-MLflow-Signature": "v1,\u00e9\u00e9".encode("latin-1")})
    assert client.post(RECEIVER_PATH, content=body, headers=non_ascii).status_code == 401
    # correctly signed, within the size limit, but nested 30,000 deep: not MLflow's envelope
    deep = b"[" * 30_000 + b"]" * 30_000
    assert client.post(RECEIVER_PATH, content=deep, headers=_signed(deep)).status_code == 400
    with pytest.raises(InvalidDelivery, match="too deeply"):
        parse_event(deep, "d-4")
    # over the size limit: 413 whether or not it is signed
    large = b" " * (MAX_BODY_BYTES + 1)
    assert client.post(RECEIVER_PATH, content=large, headers=_signed(large)).status_code == 413
    assert started == []
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404


def test_a_failure_to_start_work_is_a_503_that_mlflow_may_retry():
    """MLflow retries 5xx answers with the same delivery id: a failed delivery is not remembered
    as handled, so the retry gets through once the cause is gone."""
    from audit.errors import AuditError

    failures = [AuditError("The Prefect API has no deployment audit-and-correct/registry-audit.")]

    def on_event(event):
        if failures:
            raise failures.pop()
        return "run-1"

    client = TestClient(receiver_app(SECRET, on_event, model_name="digits-classifier"))
    body, headers = delivery("model_version_alias", "created",
                             {"name": "digits-classifier", "alias": "champion", "version": "3"})
    failed = client.post(RECEIVER_PATH, content=body, headers=headers)
    assert failed.status_code == 503 and "has no deployment" in failed.json()["detail"]
    retried = client.post(RECEIVER_PATH, content=body, headers=headers)
    assert retried.status_code == 202 and retried.json()["run"] == "run-1"


def test_receiver_and_webhook_refuse_an_empty_secret():
    with pytest.raises(InvalidDelivery):
        receiver_app("", lambda event: "x")
    with pytest.raises(InvalidDelivery):
        register_webhook(None, "http://127.0.0.1:1/x", "")


@pytest.mark.slow  # starts a real `mlflow server`
def test_mlflow_server_delivers_alias_changes_to_the_receiver(mlflow_server, tmp_path):
    """End to end over HTTP: our webhook registered on a real `mlflow server`, moving `champion`
    reaches the receiver with a signature it accepts; moving another alias is delivered and ignored."""
    import uvicorn
    from mlflow import MlflowClient

    events: queue.Queue[RegistryEvent] = queue.Queue()
    port = free_port()
    app = receiver_app(SECRET, lambda event: events.put(event) or "started", alias="champion",
                       model_name="digits-classifier")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "webhook receiver")
        client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
        url = f"http://127.0.0.1:{port}{RECEIVER_PATH}"
        webhook_id = register_webhook(client, url, SECRET)
        assert register_webhook(client, url, SECRET) == webhook_id  # idempotent: updates, no duplicate
        assert client.test_webhook(webhook_id).success

        experiment = client.create_experiment("webhooks", artifact_location=(tmp_path / "artifacts").as_uri())
        run = client.create_run(experiment)
        client.set_terminated(run.info.run_id)
        client.create_registered_model("digits-classifier")
        version = client.create_model_version("digits-classifier", f"runs:/{run.info.run_id}/model", run.info.run_id)
        client.set_registered_model_alias("digits-classifier", "challenger", version.version)
        client.set_registered_model_alias("digits-classifier", "champion", version.version)

        event = events.get(timeout=30)
        assert (event.kind, event.model_name, event.version, event.alias) == (
            "model_version_alias.created", "digits-classifier", version.version, "champion")
        time.sleep(1.0)  # the challenger delivery was sent first; it must not have started anything
        assert events.empty()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
