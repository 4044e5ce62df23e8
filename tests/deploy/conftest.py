"""A real `mlflow server` (SQL backend, loopback) for webhook tests, a free-port helper and a
polling wait with a deadline."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

SERVER_STARTUP_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@contextmanager
def mlflow_server_process(backend_uri: str, artifact_root: str, log_path: Path, port: int | None = None,
                          env: dict | None = None):
    """`mlflow server` on 127.0.0.1 over `backend_uri` and `artifact_root` (a URI), its stderr
    appended to `log_path`; yields its URL once /health answers, terminated (then killed) on exit."""
    import requests

    port = port or free_port()
    log = open(log_path, "ab")  # noqa: SIM115 - the server writes to it until teardown
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
         "--default-artifact-root", artifact_root, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, f"mlflow server exited: {log_path.read_text()[-2000:]}"
        try:
            return requests.get(f"{url}/health", timeout=2).ok
        except requests.RequestException:
            return False

    try:
        wait_until(up, SERVER_STARTUP_TIMEOUT_S, "mlflow server", interval_s=0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        log.close()


@contextmanager
def running_mlflow_server(folder: Path, template_db: Path, port: int | None = None, env: dict | None = None):
    """`mlflow server` on 127.0.0.1 with its own sqlite copy of `template_db` in `folder` (kept if
    there already); webhooks may call loopback over http (MLflow refuses both by default). Yields
    the server URL; terminated (then killed) on exit. `port`: reuse one, e.g. to restart a server
    in place; `env`: more environment variables for the server."""
    if not (folder / "server.db").exists():
        shutil.copy(template_db, folder / "server.db")
    webhooks = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                "MLFLOW_WEBHOOK_CACHE_TTL": "0"}
    with mlflow_server_process(f"sqlite:///{folder / 'server.db'}", (folder / "server-artifacts").as_uri(),
                       folder / "server.log", port, {**webhooks, **(env or {})}) as url:
        yield url


@pytest.fixture
def mlflow_server(tmp_path, migrated_mlflow_db):
    """A `running_mlflow_server` for one test. Yields the server URL."""
    with running_mlflow_server(tmp_path, migrated_mlflow_db) as url:
        yield url


@pytest.fixture(scope="module")
def shared_mlflow_server(tmp_path_factory, migrated_mlflow_db):
    """A `running_mlflow_server` shared by a module's tests (each uses its own model names)."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), migrated_mlflow_db) as url:
        yield url


@contextmanager
def running_receiver(app):
    """`app` served as the service serves the receiver (registry_hooks.webhooks.receiver_config),
    by uvicorn in a thread on a free loopback port; yields the receiver's URL."""
    import threading

    import uvicorn

    from registry_hooks.webhooks import RECEIVER_PATH, receiver_config

    server = uvicorn.Server(receiver_config(app, "127.0.0.1", free_port()))
    thread = threading.Thread(target=server.run, name="test-webhook-receiver", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), 30, "webhook receiver")
        assert server.started, "the webhook receiver did not start"
        yield f"http://127.0.0.1:{server.config.port}{RECEIVER_PATH}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
