"""Stopping `model-audit serve` stops what it started: the real command in its own process, with
Prefect's temporary API server (no PREFECT_API_URL), is sent SIGTERM; it must exit 0, and every
process it had started must be gone, not left running as an orphan."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from registry_hooks.webhooks import RECEIVER_PATH, signature
from tests.deploy.conftest import free_port, wait_until

SECRET = "s3cret-for-tests"
STARTUP_TIMEOUT_S = 180  # imports, then Prefect's temporary server: ~40 s on a busy 2-core machine
STOP_TIMEOUT_S = 60
PREFECT_SERVER = "prefect.server.api.server"

pytestmark = pytest.mark.slow  # starts `model-audit serve` and Prefect's temporary server


def process_table() -> dict[int, tuple[int, str, str]]:
    """{pid: (parent pid, state, command line)} of every process, from POSIX `ps`."""
    listing = subprocess.run(["ps", "-A", "-ww", "-o", "pid=,ppid=,stat=,args="], capture_output=True, text=True,
                             check=True).stdout
    table = {}
    for line in listing.splitlines():
        pid, ppid, stat, *args = line.split(None, 3)
        table[int(pid)] = (int(ppid), stat, args[0] if args else "")
    return table


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every live process below `pid`."""
    table = process_table()
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, stat, args) in table.items():
            if ppid == parent and child not in found and not stat.startswith("Z"):
                found[child] = args
                frontier.append(child)
    return found


def still_running(processes: dict[int, str]) -> dict[int, str]:
    """Those of `processes` still running (same pid and command line; zombies count as gone)."""
    table = process_table()
    return {pid: args for pid, args in processes.items()
            if pid in table and table[pid][2] == args and not table[pid][1].startswith("Z")}


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Serve:
    """`model-audit serve <args>` in its own session, on a fresh workdir and PREFECT_HOME, with
    no PREFECT_API_URL (so Prefect starts its temporary server as a child)."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.port = free_port()
        self.log = tmp_path / "serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
        env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "MODEL_AUDIT_WEBHOOK_SECRET": SECRET,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        command = [str(Path(sys.executable).parent / "model-audit"), "serve", "--workdir", str(tmp_path / "workdir"),
                   "--port", str(self.port), "--cron", "", *args]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        assert self.process.poll() is None, f"serve exited early ({self.process.returncode}):\n{self.output()[-3000:]}"
        return True

    def prefect_server(self) -> dict[int, str]:
        return {pid: args for pid, args in descendants(self.process.pid).items() if PREFECT_SERVER in args}

    def stop(self) -> tuple[int, dict[int, str]]:
        """SIGTERM; returns its exit code and what it had started that still runs STOP_TIMEOUT_S later."""
        started = descendants(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=STOP_TIMEOUT_S)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while still_running(started) and time.monotonic() < deadline:
            time.sleep(0.2)
        return code, still_running(started)

    def kill_leftovers(self) -> None:
        """Whatever a failed test left behind, by process group (this session's own)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=STOP_TIMEOUT_S)


def test_sigterm_stops_serve_receiver_only_and_the_prefect_server_it_started(tmp_path):
    serve = Serve(tmp_path, "--receiver-only")
    try:
        wait_until(lambda: serve.alive() and listening(serve.port), STARTUP_TIMEOUT_S, "the receiver")
        # An alias event makes the receiver call the Prefect API, which starts the temporary server
        # as a child; it has no deployment there, so the answer is 503 (retryable), not a 500.
        body = json.dumps({"entity": "model_version_alias", "action": "created", "timestamp": "t",
                           "data": {"name": "digits-classifier", "alias": "champion", "version": "1"}}).encode()
        stamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": "d-1", "X-MLflow-Timestamp": stamp,
                   "X-MLflow-Signature": signature(SECRET, "d-1", stamp, body)}
        answer = requests.post(f"http://127.0.0.1:{serve.port}{RECEIVER_PATH}", data=body, headers=headers,
                               timeout=STARTUP_TIMEOUT_S)
        assert answer.status_code == 503 and "has no deployment" in answer.json()["detail"]
        assert serve.prefect_server(), f"no Prefect server below serve:\n{serve.output()[-3000:]}"

        code, left = serve.stop()
        assert code == 0, serve.output()[-3000:]
        assert left == {}, f"still running after serve stopped: {left}"
    finally:
        serve.kill_leftovers()


def test_sigterm_stops_serve_and_the_prefect_server_it_started(tmp_path):
    serve = Serve(tmp_path)
    try:
        wait_until(lambda: serve.alive() and listening(serve.port) and "being served" in serve.output()
                   and serve.prefect_server(), STARTUP_TIMEOUT_S, "the receiver and the served deployment")
        code, left = serve.stop()
        assert code == 0, serve.output()[-3000:]
        assert left == {}, f"still running after serve stopped: {left}"
    finally:
        serve.kill_leftovers()
