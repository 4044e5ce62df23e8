"""Shared fixtures: a real MLflow sqlite store per test, the Prefect test harness (ephemeral
server, temporary database) for the session, and a guard against leaked MLflow runs."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one torch thread each. Two contended threads made
    # small torch ops up to 50x slower on these machines (a repair's fine-tuning steps, measured).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402

# The Prefect harness starts a real (ephemeral) API server; on 2 cores it needs ~25 s.
PREFECT_STARTUP_TIMEOUT_S = 60


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's ephemeral API server with a throw-away database, shared by the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=PREFECT_STARTUP_TIMEOUT_S):
        yield


@pytest.fixture(scope="session")
def migrated_mlflow_db(tmp_path_factory):
    """An empty, fully migrated MLflow sqlite database (migrating takes ~8 s here; copying it, ms)."""
    from mlflow.tracking import MlflowClient

    from registry_hooks.store import tracking_uri

    folder = tmp_path_factory.mktemp("mlflow-template")
    MlflowClient(tracking_uri(folder)).search_experiments()
    return folder / "mlflow.db"


@pytest.fixture
def mlflow_store(tmp_path, migrated_mlflow_db):
    """A fresh MLflow sqlite store (its own database file) with artifacts under tmp_path;
    returns the workdir."""
    import shutil

    import mlflow

    from registry_hooks.store import use_store

    workdir = tmp_path / "workdir"
    workdir.mkdir()
    shutil.copy(migrated_mlflow_db, workdir / "mlflow.db")
    use_store(workdir)
    yield workdir
    leaked = mlflow.active_run()
    while mlflow.active_run():
        mlflow.end_run()
    assert leaked is None, f"test left MLflow run {leaked.info.run_id} open"


@pytest.fixture(scope="session")
def digits_splits():
    """Seeded digits splits with 10% flipped training labels (shared, read-only)."""
    from audit.demo.digits import load_digits_splits

    return load_digits_splits(noise_rate=0.1, seed=0)


@pytest.fixture(scope="session")
def demo_run(prefect_harness, tmp_path_factory):
    """The demo at its defaults (train, register, audit, correct), run once per session: the
    end-to-end and browser tests read it. Tests that use it must point MLflow at its workdir
    (`registry_hooks.store.use_store(demo_run.workdir)`), since other tests move the store."""
    from flows.demo import run_demo

    return run_demo(tmp_path_factory.mktemp("demo") / "workdir")
