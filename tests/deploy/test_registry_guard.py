"""The registry guard end to end: a real `mlflow server` delivers `champion` alias events, signed,
over HTTP to the receiver, whose guard undoes (or flags) a move to an ungated version, as the
MLflow UI would make it, and keeps a gated one."""

from __future__ import annotations

import queue

import pytest

from registry_hooks.registry import GuardOutcome, promote
from registry_hooks.tags import CHAMPION_OF_RECORD, GUARD, VersionTags
from registry_hooks.webhooks import RegistryEvent, champion_guard, receiver_app, register_webhook
from tests.deploy.conftest import running_receiver

SECRET = "s3cret-for-tests"
DELIVERY_TIMEOUT_S = 60  # MLflow delivers from a thread pool, retrying with backoff

pytestmark = pytest.mark.slow  # a real `mlflow server`


class GuardedReceiver:
    """The receiver with the real guard on the server's registry, recording what it did."""

    def __init__(self, registry_uri: str, model: str, mode: str) -> None:
        self.outcomes: queue.Queue[GuardOutcome] = queue.Queue()
        self.started: queue.Queue[RegistryEvent] = queue.Queue()
        guard = champion_guard(registry_uri, mode)

        def observed_guard(event: RegistryEvent) -> GuardOutcome:
            outcome = guard(event)
            self.outcomes.put(outcome)
            return outcome

        self.app = receiver_app(SECRET, lambda event: self.started.put(event) or "started", model_name=model,
                                guard=observed_guard)

    def next_outcome(self) -> tuple[str, str]:
        outcome = self.outcomes.get(timeout=DELIVERY_TIMEOUT_S)
        return outcome.action, outcome.version


def _model(client, name: str, gated: list[bool]) -> list[str]:
    """Versions 1.. of `name` on the server, `audit.gates=passed` where `gated`."""
    experiment = client.create_experiment(name)
    client.create_registered_model(name)
    versions = []
    for i, passed in enumerate(gated):
        run = client.create_run(experiment).info.run_id
        client.set_terminated(run)
        tags = VersionTags("1", f"audit-{i}").to_mlflow() if passed else {}
        versions.append(str(client.create_model_version(name, f"runs:/{run}/model", run, tags=tags).version))
    return versions


def _champion(client, name: str) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


def _serve(client, receiver: GuardedReceiver, name: str):
    """Run the receiver with MLflow's webhook pointed at it; the webhook is deleted afterwards."""
    from contextlib import contextmanager

    @contextmanager
    def serving():
        with running_receiver(receiver.app) as url:
            webhook_id = register_webhook(client, url, SECRET, name=f"guard-{name}")
            try:
                yield
            finally:
                client.delete_webhook(webhook_id)

    return serving()


def test_an_ungated_move_is_restored_a_gated_one_kept_and_the_restore_does_not_loop(shared_mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(shared_mlflow_server, registry_uri=shared_mlflow_server)
    name = "guarded-restore"
    _, gated, ungated = _model(client, name, [False, True, False])
    receiver = GuardedReceiver(shared_mlflow_server, name, "restore")
    with _serve(client, receiver, name):
        # a legitimate promotion: gated, recorded, delivered, kept, and it starts an audit
        promote(name, gated, client=client)
        assert receiver.next_outcome() == ("kept", gated)
        assert receiver.started.get(timeout=DELIVERY_TIMEOUT_S).version == gated

        # champion moved by hand (the MLflow UI does exactly this call) to a version with no gates
        client.set_registered_model_alias(name, "champion", ungated)
        assert receiver.next_outcome() == ("restored", ungated)
        # the restore is an alias event too; kept, so the guard does not answer it again
        assert receiver.next_outcome() == ("kept", gated)
        assert receiver.started.get(timeout=DELIVERY_TIMEOUT_S).version == gated

    assert _champion(client, name) == gated
    assert client.get_model_version(name, ungated).tags[GUARD].startswith(
        f"restored: @champion was moved to version {ungated}, which lacks audit.gates=passed")
    assert client.get_registered_model(name).tags[CHAMPION_OF_RECORD] == gated
    assert GUARD not in client.get_model_version(name, gated).tags
    # the reverted move started no audit: the two audits started were both of the gated version
    assert receiver.started.empty() and receiver.outcomes.empty()


def test_flag_mode_only_flags_an_ungated_move(shared_mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(shared_mlflow_server, registry_uri=shared_mlflow_server)
    name = "guarded-flag"
    _, gated, ungated, newer_gated = _model(client, name, [False, True, False, True])
    receiver = GuardedReceiver(shared_mlflow_server, name, "flag")
    with _serve(client, receiver, name):
        promote(name, gated, client=client)
        assert receiver.next_outcome() == ("kept", gated)
        client.set_registered_model_alias(name, "champion", ungated)
        assert receiver.next_outcome() == ("flagged", ungated)
        assert _champion(client, name) == ungated
        promote(name, newer_gated, client=client)
        assert receiver.next_outcome() == ("kept", newer_gated)

    assert _champion(client, name) == newer_gated
    assert client.get_model_version(name, ungated).tags[GUARD].startswith(
        f"flagged: @champion was moved to version {ungated}, which lacks audit.gates=passed")
    assert client.get_registered_model(name).tags[GUARD].startswith(f"version {ungated} flagged:")
    started = {receiver.started.get(timeout=DELIVERY_TIMEOUT_S).version for _ in range(3)}
    assert started == {gated, ungated, newer_gated}  # flag mode leaves the audits to run


def test_the_guard_outlives_a_restart_of_the_mlflow_server(tmp_path, migrated_mlflow_db, monkeypatch):
    """The receiver keeps running while the `mlflow server` stops and starts again on the same
    database: a delivery it cannot check meanwhile is a 503 (MLflow retries those with the same
    delivery id) and goes through once the server is back; the webhook, the champion of record
    and the guard all survive the restart. MLflow encrypts webhook secrets with
    MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY, a fresh random key per process when unset, so the
    server needs a fixed one to deliver after a restart (docs/deploy.md)."""
    import json
    import time

    import requests
    from cryptography.fernet import Fernet
    from mlflow import MlflowClient

    from registry_hooks.webhooks import signature
    from tests.deploy.conftest import free_port, running_mlflow_server

    # MLflow's client retries a refused connection for minutes by default; the outage is the point here
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port, name = free_port(), "guarded-restart"
    url = f"http://127.0.0.1:{port}"
    server_env = {"MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode()}
    receiver = GuardedReceiver(url, name, "restore")
    with running_receiver(receiver.app) as receiver_url:
        with running_mlflow_server(tmp_path, migrated_mlflow_db, port, server_env):
            client = MlflowClient(url, registry_uri=url)
            _, gated, ungated = _model(client, name, [False, True, False])
            register_webhook(client, receiver_url, SECRET, name=f"guard-{name}")
            promote(name, gated, client=client)
            assert receiver.next_outcome() == ("kept", gated)
            receiver.started.get(timeout=DELIVERY_TIMEOUT_S)

        # the server is down: a delivery that reaches the receiver now cannot be checked
        body = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "t",
                           "data": {"name": name, "alias": "champion", "version": ungated}}).encode()
        stamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": "during-outage",
                   "X-MLflow-Timestamp": stamp, "X-MLflow-Signature": signature(SECRET, "during-outage", stamp, body)}
        outage = requests.post(receiver_url, data=body, headers=headers, timeout=DELIVERY_TIMEOUT_S)
        assert outage.status_code == 503, outage.text

        with running_mlflow_server(tmp_path, migrated_mlflow_db, port, server_env):  # restarted, same database
            # MLflow's retry of that delivery: champion never moved, so the event is stale and starts the audit
            retried = requests.post(receiver_url, data=body, headers=headers, timeout=DELIVERY_TIMEOUT_S)
            assert retried.status_code == 202 and retried.json()["guard"]["action"] == "stale"
            assert receiver.outcomes.get(timeout=DELIVERY_TIMEOUT_S).action == "stale"
            # a real ungated move, delivered by the restarted server through the webhook it kept
            client.set_registered_model_alias(name, "champion", ungated)
            assert receiver.next_outcome() == ("restored", ungated)
            assert receiver.next_outcome() == ("kept", gated)
            assert _champion(client, name) == gated
