"""Logging audit and correction outputs into MLflow runs (DESIGN.md "MLflow layout"); their tags
are registry_hooks.tags."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import pandas as pd

AUDIT_DIR = "audit"


def log_tables(tables: dict[str, pd.DataFrame], artifact_dir: str = AUDIT_DIR) -> None:
    """Log each DataFrame as `<artifact_dir>/<name>.parquet` into the active run."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, frame in tables.items():
            path = Path(tmp) / f"{name}.parquet"
            frame.to_parquet(path, index=False)
            mlflow.log_artifact(str(path), artifact_path=artifact_dir)


def log_json(payload: dict, filename: str, artifact_dir: str = AUDIT_DIR) -> None:
    """Log a JSON document as `<artifact_dir>/<filename>`."""
    mlflow.log_text(json.dumps(payload, indent=2, default=str), f"{artifact_dir}/{filename}")


def log_files(paths: list[Path], artifact_dir: str = AUDIT_DIR) -> None:
    """Log local files (report, images, ONNX) under `artifact_dir`."""
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_dir)


def load_table(run_id: str, name: str, artifact_dir: str = AUDIT_DIR) -> pd.DataFrame:
    """Read back `<artifact_dir>/<name>.parquet` of a run."""
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{artifact_dir}/{name}.parquet",
                                                    dst_path=tmp)
        return pd.read_parquet(local)
