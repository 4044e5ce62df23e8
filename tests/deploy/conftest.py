"""A real `mlflow server` (SQL backend, loopback) for webhook tests, and a free-port helper."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

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


@pytest.fixture
def mlflow_server(tmp_path, migrated_mlflow_db):
    """`mlflow server` on 127.0.0.1 with its own sqlite copy; webhooks may call loopback over http
    (MLflow refuses both by default). Yields the server URL."""
    import requests

    shutil.copy(migrated_mlflow_db, tmp_path / "server.db")
    port = free_port()
    env = {**os.environ, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_CACHE_TTL": "0"}
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - the server writes to it until teardown
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", (tmp_path / "server-artifacts").as_uri(), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
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
        log.close()
