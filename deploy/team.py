"""The team setup on one machine, every server on loopback: PostgreSQL, an MLflow tracking server
on it (artifacts served by the server), a Prefect server (on PostgreSQL too), a process work pool
with a worker that runs the `audit-and-correct` deployment, a Dask scheduler and workers for the
gradient index, and the MLflow webhook receiver, with the webhook registered.

    python -m deploy.team up --state team-state --workdir audit-workdir --model digits-classifier
    python -m deploy.team down --state team-state

`up` writes `<state>/team.json` (every URL, every process group it started) and returns once all
of them answer; `down` stops them, newest first (SIGTERM, then SIGKILL after 20 s) and stops
PostgreSQL. In Python, `team_stack(state, service)` is the same as a context manager. Logs are in
`<state>/logs/`. docs/deploy.md says how each piece maps onto a real installation (one host per
server, passwords, S3) and deploy/compose.yaml is the same services for Docker.

PostgreSQL refuses to run as root: as root, its cluster lives in a folder of its own owned by the
`postgres` user, and initdb/pg_ctl run as that user (runuser). Authentication is `trust` on
127.0.0.1 only: this is a one-machine setup; a shared server needs passwords (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from audit.errors import AuditError

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PG_USER = "audit"
POOL = "model-audit"
STARTUP_TIMEOUT_S = 240  # MLflow and Prefect migrate their PostgreSQL schemas on first start
SECRET_ENV = "MODEL_AUDIT_WEBHOOK_SECRET"


@dataclass
class Team:
    """What `up` started: URLs, the PostgreSQL data folder, and process groups (name -> pid)."""

    state: str
    pg_data: str
    pg_port: int
    mlflow_url: str
    prefect_api_url: str
    dask_address: str
    receiver_url: str
    processes: dict[str, int] = field(default_factory=dict)

    @property
    def postgres_uri(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.pg_port}"

    def save(self) -> None:
        Path(self.state, "team.json").write_text(json.dumps(asdict(self), indent=1))

    @staticmethod
    def load(state: Path) -> Team:
        return Team(**json.loads((Path(state) / "team.json").read_text()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate, what: str, team: Team, name: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Until `predicate()`; AuditError with the end of its log when process `name` exits or the
    time runs out."""
    log = Path(team.state) / "logs" / f"{name}.log"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(team.processes[name], os.WNOHANG)[0]:
                break  # exited
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
    raise AuditError(f"{what} did not come up (log {log}): {tail}")


def _answers(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if found is None:
        raise AuditError(f"PostgreSQL's {name} is not installed (apt-get install postgresql).")
    return str(found)


def start_postgres(state: Path) -> tuple[str, int]:
    """A fresh PostgreSQL cluster on 127.0.0.1 with databases `mlflow` and `prefect`; returns its
    data folder and port."""
    import psycopg2

    if os.geteuid() == 0:  # its own folder owned by postgres: it cannot enter root's private folders
        data_root = Path(tempfile.mkdtemp(prefix="model-audit-pg-"))
        shutil.chown(data_root, "postgres", "postgres")
    else:
        data_root = state / "postgres"
        data_root.mkdir()
    data, port = data_root / "data", free_port()
    subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data}"
    subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(data_root / "postgres.log"), "-w",
                                 "-t", "60", "-o", options, "start"]), check=True, capture_output=True)
    connection = psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        for database in ("mlflow", "prefect"):
            cursor.execute(f"CREATE DATABASE {database}")
    connection.close()
    return str(data), port


def stop_postgres(data: str) -> None:
    subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", data, "-m", "fast", "-w", "stop"]), capture_output=True)
    if os.geteuid() == 0:
        shutil.rmtree(Path(data).parent, ignore_errors=True)


def _spawn(team: Team, name: str, command: list[str], env: dict[str, str]) -> None:
    log = Path(team.state) / "logs" / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                   cwd=REPO_ROOT, start_new_session=True)
    team.processes[name] = process.pid
    team.save()


def alive(pid: int) -> bool:
    """Whether the process group `pid` leads still has a process."""
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


def stop(team: Team) -> None:
    """Stop every process group `up` started, newest first, then PostgreSQL."""
    for name, pid in reversed(list(team.processes.items())):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        team.processes.pop(name)
        team.save()
    if team.pg_data:
        stop_postgres(team.pg_data)


def up(state: Path, service, dask_workers: int = 2, secret: str | None = None) -> Team:
    """Start the whole setup for `service` (deploy.service.ServiceSettings: its store's
    tracking_uri, audit.dask_address and port are replaced by the servers started here); returns
    the Team. On any failure, what was started is stopped again."""
    state = Path(state).resolve()
    (state / "logs").mkdir(parents=True, exist_ok=True)
    secret = secret or os.environ.get(SECRET_ENV) or os.urandom(32).hex()
    team = Team(str(state), "", 0, "", "", "", "")
    try:
        team.pg_data, team.pg_port = start_postgres(state)
        team.save()
        from cryptography.fernet import Fernet

        mlflow_port, prefect_port, dask_port, receiver_port = (free_port() for _ in range(4))
        team.mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        mlflow_env = {"MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
                      # the receiver is on loopback over http: allow it (MLflow refuses both by default)
                      "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true"}
        _spawn(team, "mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                                f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{team.pg_port}/mlflow", "--serve-artifacts",
                                "--artifacts-destination", str(state / "artifacts"), "--host", "127.0.0.1", "--port",
                                str(mlflow_port), "--workers", "1"], mlflow_env)
        team.prefect_api_url = f"http://127.0.0.1:{prefect_port}/api"
        prefect_env = {"PREFECT_HOME": str(state / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_API_DATABASE_CONNECTION_URL":
                           f"postgresql+asyncpg://{PG_USER}@127.0.0.1:{team.pg_port}/prefect"}
        _spawn(team, "prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                      "--port", str(prefect_port)], prefect_env)
        team.dask_address = f"tcp://127.0.0.1:{dask_port}"
        _spawn(team, "dask-scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                                   str(dask_port), "--no-dashboard"], {})
        for i in range(dask_workers):
            _spawn(team, f"dask-worker-{i}", [str(BIN / "dask"), "worker", team.dask_address, "--host", "127.0.0.1",
                                              "--nthreads", "1", "--no-dashboard"], {})
        _wait(lambda: _answers(f"{team.mlflow_url}/health"), "The MLflow server", team, "mlflow")
        _wait(lambda: _answers(f"{team.prefect_api_url}/health"), "The Prefect server", team, "prefect-server")
        _wait(lambda: _listening(dask_port), "The Dask scheduler", team, "dask-scheduler")

        service = service.model_copy(update={
            "store": service.store.model_copy(update={"tracking_uri": team.mlflow_url}),
            "audit": service.audit.model_copy(update={"dask_address": team.dask_address, "workers": None}),
            "port": receiver_port, "host": "127.0.0.1", "cron": None})
        settings_file = state / "service.json"
        settings_file.write_text(service.model_dump_json(indent=1))
        api = {"PREFECT_API_URL": team.prefect_api_url, "PREFECT_HOME": str(state / "prefect-client")}
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process", "--overwrite"],
                       env={**os.environ, **api}, check=True, capture_output=True, cwd=REPO_ROOT)
        subprocess.run([sys.executable, "-m", "deploy.team", "deploy-flow", "--settings", str(settings_file)],
                       env={**os.environ, **api}, check=True, capture_output=True, cwd=REPO_ROOT)
        _spawn(team, "prefect-worker", [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"],
               {**api, "PREFECT_WORKER_QUERY_SECONDS": "2"})
        team.receiver_url = f"http://127.0.0.1:{receiver_port}/mlflow/webhook"
        _spawn(team, "receiver", [sys.executable, "-m", "deploy.team", "receiver", "--settings", str(settings_file)],
               {**api, SECRET_ENV: secret})
        _wait(lambda: _listening(receiver_port), "The webhook receiver", team, "receiver")
        from registry_hooks.webhooks import register_webhook_at

        register_webhook_at(team.mlflow_url, team.receiver_url, secret)
        team.save()
        return team
    except BaseException:
        stop(team)
        raise


@contextlib.contextmanager
def team_stack(state: Path, service, dask_workers: int = 2) -> Iterator[Team]:
    """`up`, then `stop` on exit, whatever happened."""
    team = up(state, service, dask_workers)
    try:
        yield team
    finally:
        stop(team)


def _deploy_flow(settings_file: Path) -> None:
    """Register the `audit-and-correct/registry-audit` deployment on the work pool, its code this
    checkout (the worker runs it from here), its parameters the service's."""
    from deploy.service import DEPLOYMENT, ServiceSettings
    from flows.pipeline import audit_and_correct

    service = ServiceSettings.model_validate_json(Path(settings_file).read_text())
    audit_and_correct.from_source(source=str(REPO_ROOT), entrypoint="flows/pipeline.py:audit_and_correct").deploy(
        name=DEPLOYMENT, work_pool_name=POOL, parameters=service.parameters(), tags=["model-audit"],
        concurrency_limit=1, build=False, push=False, print_next_steps=False)


def _receiver(settings_file: Path) -> None:
    from deploy.service import ServiceSettings, serve

    service = ServiceSettings.model_validate_json(Path(settings_file).read_text())
    serve(service, os.environ[SECRET_ENV], receiver_only=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.team", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start everything; prints the URLs")
    start.add_argument("--state", type=Path, required=True)
    start.add_argument("--workdir", type=Path, required=True)
    start.add_argument("--model", default="digits-classifier")
    start.add_argument("--dask-workers", type=int, default=2)
    start.add_argument("--allow-pickle", action="store_true")
    finish = commands.add_parser("down", help="stop everything `up` started")
    finish.add_argument("--state", type=Path, required=True)
    for internal in ("deploy-flow", "receiver"):
        commands.add_parser(internal, help=argparse.SUPPRESS).add_argument("--settings", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "deploy-flow":
        _deploy_flow(args.settings)
    elif args.command == "receiver":
        _receiver(args.settings)
    elif args.command == "down":
        stop(Team.load(args.state))
    else:
        from deploy.service import ServiceSettings
        from flows.settings import AuditSettings, StoreSettings

        service = ServiceSettings(store=StoreSettings(workdir=args.workdir.resolve(), allow_pickle=args.allow_pickle),
                                  audit=AuditSettings(model_name=args.model))
        team = up(args.state, service, args.dask_workers)
        print(json.dumps({k: v for k, v in asdict(team).items() if k != "processes"}, indent=1))


if __name__ == "__main__":
    main()
