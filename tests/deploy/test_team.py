"""The team setup for real (deploy/team.py): PostgreSQL, MLflow on it with served artifacts, a
Prefect server with a process work pool and a worker, a Dask scheduler with two workers and the
webhook receiver, all on loopback. Moving `champion` in that registry gets the worker to audit the
version (scoring on Dask) and register a gated `challenger`; stopping the setup stops it all."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

MODEL = "team-digits"
RUN_TIMEOUT_S = 900  # a cold worker: flow-run process start, an audit with the index on Dask, the repair search


def _why_no_postgres() -> str | None:
    if shutil.which("initdb") is None and not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        return "PostgreSQL is not installed here (apt-get install postgresql): the team setup cannot start"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL cannot be started as its own user"
    return None


def test_a_champion_move_is_audited_by_the_worker_on_dask_and_a_gated_challenger_registered(tmp_path,
                                                                                           digits_splits):
    reason = _why_no_postgres()
    if reason:
        pytest.skip(reason)
    import psycopg2
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from audit.flagged import write_batch
    from deploy.service import ServiceSettings
    from deploy.team import POOL, alive, team_stack
    from flows.settings import AuditSettings, CorrectionSettings, GateSettings, StoreSettings
    from registry_hooks.registry import register_version
    from registry_hooks.store import use_store
    from tests.digits_helpers import log_small_cnn

    workdir = tmp_path / "workdir"
    # gates that every finite repair passes (what is tested is who runs what, not the gate values)
    permissive = GateSettings(min_fix_rate=0.0, max_accuracy_drop_points=100.0, max_class_recall_drop_points=100.0,
                              max_canary_flip_rate=1.0)
    service = ServiceSettings(store=StoreSettings(workdir=workdir, allow_pickle=True),
                              audit=AuditSettings(model_name=MODEL, method="index", top_k=5),
                              correction=CorrectionSettings(candidates=("relabel",), gates=permissive))
    with team_stack(tmp_path / "state", service) as team:
        started = dict(team.processes)
        use_store(workdir, tracking=team.mlflow_url)
        uri, frame = log_small_cnn(digits_splits, n_flagged=4)
        write_batch(frame, workdir / "inbox" / "batch.parquet")
        register_version(uri, MODEL, "champion")  # the alias event: MLflow -> receiver -> Prefect -> worker

        client = MlflowClient(team.mlflow_url, registry_uri=team.mlflow_url)

        def challenger_version():
            try:
                return client.get_model_version_by_alias(MODEL, "challenger")
            except MlflowException:
                return None

        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (challenger := challenger_version()) is None and time.monotonic() < deadline:
            time.sleep(2)
        assert challenger is not None, (tmp_path / "state" / "logs" / "prefect-worker.log").read_text()[-3000:]
        assert challenger.tags["audit.gates"] == "passed" and challenger.tags["audit.source_version"] == "1"
        audit_run = client.get_run(challenger.tags["audit.audit_run_id"])
        assert audit_run.data.params["scale_out"] == f"dask {team.dask_address}"
        assert audit_run.data.params["method"] == "index"
        # the artifacts went through the MLflow server, not to a folder the client wrote itself
        assert audit_run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert (Path(team.state) / "artifacts").is_dir() and not (workdir / "mlruns").exists()
        # the registry is the PostgreSQL database
        with psycopg2.connect(host="127.0.0.1", port=team.pg_port, user="audit", dbname="mlflow") as connection, \
                connection.cursor() as cursor:
            cursor.execute("SELECT version FROM model_versions WHERE name = %s ORDER BY version", (MODEL,))
            assert [row[0] for row in cursor.fetchall()] == [1, int(challenger.version)]
        # the run was the worker's, on the work pool, started by the registry event
        def deployment_runs():
            runs = requests.post(f"{team.prefect_api_url}/flow_runs/filter", json={}, timeout=10).json()
            return [r for r in runs if r["deployment_id"] is not None]

        deadline = time.monotonic() + 300  # the run registers the challenger, then publishes and ends
        while deployment_runs()[0]["state_type"] in ("SCHEDULED", "PENDING", "RUNNING") and time.monotonic() < deadline:
            time.sleep(2)
        (run,) = deployment_runs()
        assert run["state_type"] == "COMPLETED" and run["work_pool_name"] == POOL
        assert "mlflow:alias" in " ".join(run["tags"]) or any(t.startswith("mlflow:") for t in run["tags"])
    assert not any(alive(pid) for pid in started.values())
    assert not Path(team.pg_data).exists() or not (Path(team.pg_data) / "postmaster.pid").exists()
