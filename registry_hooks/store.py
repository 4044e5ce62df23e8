"""Where MLflow keeps things: the embedded default is `sqlite:///<workdir>/mlflow.db` with
artifacts in `<workdir>/mlruns` (DESIGN.md "Embedded defaults").

MLflow records artifact locations as absolute URIs, so a copied or moved workdir still points at
the original's artifacts. `use_store` refuses such a workdir (an audit would write into, or read
from, the original), and `relocate` rewrites the copy's store to point at its own artifacts.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow

from audit.errors import AuditError
from registry_hooks.tags import DATA_SOURCE

EXPERIMENT = "model-audit"
DATABASE = "mlflow.db"
ARTIFACTS = "mlruns"

# Columns of MLflow's SQL schema that hold an artifact location as a URI or path; a value under the
# old workdir is rewritten by `relocate`. The model files themselves are left as they are: their
# digest (registry_hooks.model_io) covers MLmodel, which names the path it was logged at.
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
    ("logged_models", "artifact_location"),
)


class StoreMoved(AuditError):
    """The workdir's store points at artifacts outside it: the workdir was copied or moved."""


def tracking_uri(workdir: Path) -> str:
    """The sqlite tracking/registry URI of a workdir."""
    return f"sqlite:///{Path(workdir).resolve() / DATABASE}"


def ui_command(workdir: Path) -> str:
    """The shell command that opens the MLflow UI on a workdir's store."""
    workdir = Path(workdir).resolve()
    return (
        f"mlflow ui --backend-store-uri {tracking_uri(workdir)} "
        f"--default-artifact-root {(workdir / ARTIFACTS).as_uri()} --port 5000"
    )


def use_store(workdir: Path, experiment: str = EXPERIMENT, tracking: str | None = None) -> str:
    """Point MLflow at the workdir's store (or `tracking`, e.g. an MLflow server URL) and make
    `experiment` active, creating it with artifacts under `<workdir>/mlruns` (on an http(s) server:
    where the server puts artifacts, e.g. served by it). Returns its id.
    StoreMoved when the workdir's own store keeps that experiment's artifacts elsewhere (a copied
    or moved workdir, not relocated yet)."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Alembic's migration chatter on a fresh sqlite store is noise for our users.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking or tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        # an `mlflow server` keeps the artifacts where it is configured to (e.g. --serve-artifacts)
        served = uri.startswith(("http://", "https://"))
        experiment_id = mlflow.create_experiment(
            experiment, artifact_location=None if served else (workdir / ARTIFACTS).as_uri())
    else:
        if tracking is None and _local_path(found.artifact_location) not in (None, workdir / ARTIFACTS):
            raise StoreMoved(f"The MLflow store in {workdir} keeps its artifacts in "
                             f"{_local_path(found.artifact_location)}, outside this workdir (it was copied or moved); "
                             f"run `model-audit relocate --workdir {workdir}` first.")
        experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@dataclass(frozen=True)
class Relocation:
    """What `relocate` did: the workdir the store pointed into before (`moved_from`, None when it
    already pointed into its own) and how many recorded locations were rewritten, per column."""

    workdir: Path
    moved_from: Path | None
    rewritten: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.rewritten.values())


def relocate(workdir: Path) -> Relocation:
    """Make a copied or moved workdir's store point at its own artifacts: every artifact location
    it records under the workdir it was made in (the `model-audit` experiment's artifact root,
    `<old workdir>/mlruns`) is rewritten to the same place under `workdir`: experiments, runs,
    model versions, logged models, and the paths of local dataset sources, including the training
    data a run records by reference (run tags `audit.data.<split>`). Locations elsewhere
    (an S3 bucket, another folder) are left alone. One transaction; idempotent (a store that
    already points into `workdir` is left unchanged). Run it while nothing else uses the store.
    AuditError when `workdir` holds no MLflow store."""
    workdir = Path(workdir).resolve()
    database = workdir / DATABASE
    if not database.is_file():
        raise AuditError(f"{workdir} holds no MLflow store ({DATABASE}) to relocate.")
    with closing(sqlite3.connect(database)) as db, db:  # one transaction: committed, or rolled back on an error
        row = db.execute("SELECT artifact_location FROM experiments WHERE name = ?", (EXPERIMENT,)).fetchone()
        recorded = _local_path(row[0]) if row else None
        if recorded is None or recorded.name != ARTIFACTS or recorded == workdir / ARTIFACTS:
            return Relocation(workdir, None, {})
        old = recorded.parent
        rewritten = {}
        for table, column in LOCATION_COLUMNS:
            if not _has_column(db, table, column):  # e.g. logged_models, new in MLflow 3
                continue
            values = db.execute(f"SELECT rowid, {column} FROM {table} WHERE {column} IS NOT NULL").fetchall()
            changed = {k: _moved(v, old, workdir) for k, v in values if _moved(v, old, workdir) != v}
            db.executemany(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", [(v, k) for k, v in changed.items()])
            rewritten[f"{table}.{column}"] = len(changed)
        rewritten["datasets.dataset_source"] = _relocate_dataset_sources(db, old, workdir)
        rewritten["tags.audit.data"] = _relocate_data_tags(db, old, workdir)
    return Relocation(workdir, old, rewritten)


def _moved(value: str, old: Path, new: Path) -> str:
    """`value` with the prefix `old` (as a file URI or a plain path) replaced by `new`; others unchanged."""
    for before, after in ((old.as_uri(), new.as_uri()), (str(old), str(new))):
        if value == before or value.startswith(before + "/"):
            return after + value[len(before):]
    return value


def _relocate_dataset_sources(db: sqlite3.Connection, old: Path, new: Path) -> int:
    """Rewrite the `uri` (or `path`) of local dataset sources (JSON) that lie under `old`."""
    if not _has_column(db, "datasets", "dataset_source"):
        return 0
    count = 0
    for rowid, source in db.execute("SELECT rowid, dataset_source FROM datasets").fetchall():
        try:
            parsed = json.loads(source)
        except ValueError:
            continue
        if not isinstance(parsed, dict):
            continue
        moved = {k: _moved(v, old, new) if k in ("uri", "path") and isinstance(v, str) else v
                 for k, v in parsed.items()}
        if moved != parsed:
            db.execute("UPDATE datasets SET dataset_source = ? WHERE rowid = ?", (json.dumps(moved), rowid))
            count += 1
    return count


def _relocate_data_tags(db: sqlite3.Connection, old: Path, new: Path) -> int:
    """Rewrite the `uri` of the training-data references (run tags `audit.data.<split>`, JSON; the
    source audits read first) that lie under `old`: the demos keep their data in the workdir."""
    count = 0
    prefix = DATA_SOURCE.split("{")[0]
    for rowid, value in db.execute("SELECT rowid, value FROM tags WHERE key LIKE ?", (prefix + "%",)).fetchall():
        try:
            parsed = json.loads(value)
        except (TypeError, ValueError):
            continue
        if isinstance(parsed, dict) and isinstance(parsed.get("uri"), str):
            moved = _moved(parsed["uri"], old, new)
            if moved != parsed["uri"]:
                db.execute("UPDATE tags SET value = ? WHERE rowid = ?", (json.dumps({**parsed, "uri": moved}), rowid))
                count += 1
    return count


def _has_column(db: sqlite3.Connection, table: str, column: str) -> bool:
    return any(row[1] == column for row in db.execute(f"PRAGMA table_info({table})"))


def _local_path(location: str | None) -> Path | None:
    """The resolved local path of a `file:` URI or plain path; None for other schemes (s3:, ...)."""
    if not location:
        return None
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve()
    if parsed.scheme == "" and location.startswith("/"):
        return Path(location).resolve()
    return None
