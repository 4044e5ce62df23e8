"""Where MLflow keeps things: the embedded default is `sqlite:///<workdir>/mlflow.db` with
artifacts in `<workdir>/mlruns` (DESIGN.md "Embedded defaults")."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow

EXPERIMENT = "model-audit"


def tracking_uri(workdir: Path) -> str:
    """The sqlite tracking/registry URI of a workdir."""
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def ui_command(workdir: Path) -> str:
    """The shell command that opens the MLflow UI on a workdir's store."""
    workdir = Path(workdir).resolve()
    return (
        f"mlflow ui --backend-store-uri {tracking_uri(workdir)} "
        f"--default-artifact-root {(workdir / 'mlruns').as_uri()} --port 5000"
    )


def use_store(workdir: Path, experiment: str = EXPERIMENT, tracking: str | None = None) -> str:
    """Point MLflow at the workdir's store (or `tracking`, e.g. an MLflow server URL) and make
    `experiment` active, creating it with artifacts under `<workdir>/mlruns`. Returns its id."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Alembic's migration chatter on a fresh sqlite store is noise for our users.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking or tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        experiment_id = mlflow.create_experiment(experiment, artifact_location=(workdir / "mlruns").as_uri())
    else:
        experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id
