"""Logging audit and correction outputs into MLflow runs (DESIGN.md "MLflow layout"); their tags
are registry_hooks.tags."""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from audit.audit_report import suspects_table
from audit.correction.report import CorrectionFindings
from audit.errors import AuditError
from audit.examples import ExampleTable
from audit.findings import AuditFindings
from audit.report_page import image_pixels
from registry_hooks import tags
from registry_hooks.tags import RunTags

AUDIT_DIR = "audit"
CORRECTION_DIR = "correction"
# Where `make ui` / `mlflow ui` serves a local sqlite store (registry_hooks.store.ui_command).
LOCAL_UI = "http://127.0.0.1:5000"


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


def log_review_table(table: pd.DataFrame, examples: ExampleTable, id_column: str, artifact_file: str) -> None:
    """Log `table` with `mlflow.log_table` (MLflow's own table view of the run) as `artifact_file`
    (.json); with each row's example (rows name it in `id_column`) as a `picture` column when
    `examples` are images, as a `text` column when they are sentences. Missing values are logged as null."""
    table = table.astype(object).where(table.notna(), None)
    positions = examples.positions(table[id_column])
    if examples.display is not None:
        table = table.assign(text=[examples.display[i] for i in positions])
    pictures = [image_pixels(examples.inputs[i]) for i in positions] if examples.display is None else []
    if pictures and all(p is not None for p in pictures):
        table = table.assign(picture=[mlflow.Image(p) for p in pictures])
    mlflow.log_table(table, artifact_file)


def run_links(run_id: str, report: str) -> dict[str, str]:
    """Where a reviewer finds a run: its page in the MLflow UI (for a local sqlite store, the
    address `make ui` serves) and the URI of its `report` artifact (run-relative path)."""
    run = MlflowClient().get_run(run_id)
    uri = mlflow.get_tracking_uri()
    server = uri.startswith(("http://", "https://"))
    label = "MLflow run" if server else "MLflow run (after `make ui`)"
    return {label: f"{uri.rstrip('/') if server else LOCAL_UI}/#/experiments/{run.info.experiment_id}/runs/{run_id}",
            "report": f"{run.info.artifact_uri}/{report}"}


def load_table(run_id: str, name: str, artifact_dir: str = AUDIT_DIR) -> pd.DataFrame:
    """Read back `<artifact_dir>/<name>.parquet` of a run."""
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{artifact_dir}/{name}.parquet",
                                                    dst_path=tmp)
        return pd.read_parquet(local)


def log_correction(findings: CorrectionFindings, metrics: dict[str, float], params: dict[str, object],
                   files: list[Path], onnx: Path | None) -> None:
    """Everything a correction run logs, before any registry call: the horizon as metrics
    `horizon_pearson` / `horizon_spearman` (MLflow step = fine-tuning steps), `metrics` and
    `params`, `correction/gates.json` (when a candidate was gated), `influence_horizon` and the
    tables of audit.correction.report.correction_tables as Parquet, the candidates also as an
    MLflow table (`correction/candidates.json`), `files` (report.html, the horizon plot), the
    ONNX export under `onnx/`, and tag `audit.gates=passed|failed`."""
    tables = findings.tables
    for row in findings.horizon.itertuples(index=False):
        mlflow.log_metrics({"horizon_pearson": float(row.pearson), "horizon_spearman": float(row.spearman)},
                           step=int(row.steps))
    mlflow.log_params(params)
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
    if findings.gates is not None:
        log_json(findings.gates.to_dict(), "gates.json", artifact_dir=CORRECTION_DIR)
    log_tables({"influence_horizon": findings.horizon, **tables}, artifact_dir=CORRECTION_DIR)
    mlflow.log_table(tables["candidates"], f"{CORRECTION_DIR}/candidates.json")
    log_files(files, artifact_dir=CORRECTION_DIR)
    if onnx is not None and onnx.exists():
        log_files([onnx], artifact_dir="onnx")
    mlflow.set_tag(tags.GATES, tags.GATES_PASSED if findings.passed else tags.GATES_FAILED)


def log_audit(findings: AuditFindings, params: dict[str, object], frame: pd.DataFrame, validation: dict,
              files: list[Path]) -> None:
    """Everything an audit run logs (DESIGN.md "MLflow layout"): `params`, the counts as metrics,
    the findings' tables and the audited batch (`flagged`) as Parquet under `audit/`, the
    suspects as an MLflow table with pictures (`audit/suspects.json`), the batch's validation
    result as `audit/flagged_validation.json`, and `files` (report, grid)."""
    mlflow.log_params(params)
    mlflow.log_metrics({"n_flagged": len(findings.flagged), "n_candidates": len(findings.candidates),
                        "n_relabel_candidates": findings.n_relabel_candidates})
    log_tables({"influence": findings.influence, "self_influence": findings.self_influence,
                "correction_candidates": findings.candidates, "flagged": frame})
    log_review_table(suspects_table(findings.candidates), findings.train, "train_id", f"{AUDIT_DIR}/suspects.json")
    log_json(validation, "flagged_validation.json")
    log_files(files)


def index_params(index: dict | None) -> dict[str, object]:
    """Run params that say which gradient index an audit's scores came from (none without one):
    its rows, columns, ranks, damping and folder under the workdir's cache, and with re-ranking its
    method, shortlist per side, rows its curvature was fitted on and rows it scored exactly."""
    if index is None:
        return {}
    config, rerank = index["config"], index.get("rerank") or {}
    return {"index_rows": index["rows"], "index_dim": index["dim"], "index_rank_in": config["rank_in"],
            "index_rank_out": config["rank_out"], "index_damping": index["damping"], "index_folder": index["folder"],
            **{f"rerank_{key}": value for key, value in rerank.items()}}


@contextmanager
def mlflow_run(name: str, run_tags: RunTags | None = None):
    """An MLflow run named `name` (with `run_tags`), active inside the block; yields its id."""
    with mlflow.start_run(run_name=name, tags=run_tags.to_mlflow() if run_tags else None) as run:
        yield run.info.run_id


def finished_audit(run_id: str) -> RunTags:
    """The tags of audit run `run_id`, which must exist, be an audit run and have FINISHED (an
    audit that died after it started logging has partial artifacts); AuditError otherwise."""
    try:
        run = MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise AuditError(f"No audit run {run_id} in this MLflow store.") from exc
    run_tags = RunTags.from_mlflow(run.data.tags, run_id)
    if run_tags.kind != "audit":
        raise AuditError(f"Run {run_id} is not an audit run (it is a {run_tags.kind} run).")
    if run.info.status != "FINISHED":
        raise AuditError(f"Audit run {run_id} is {run.info.status}, not FINISHED; only a completed audit "
                         "can be corrected (re-run the audit).")
    return run_tags


def run_params(run_id: str) -> dict[str, str]:
    """The params a run logged (as MLflow stores them: strings)."""
    return dict(MlflowClient().get_run(run_id).data.params)


def audit_runs_for_batch(flagged_digest: str) -> dict[str, str]:
    """{run id: status} of the audit runs that audited a batch with this content digest."""
    found = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string=f"tags.`{tags.KIND}` = 'audit' and "
                                             f"tags.`{tags.FLAGGED_DIGEST}` = '{flagged_digest}'")
    return {run.info.run_id: run.info.status for run in found}


def mark_failed(run_id: str) -> None:
    """End a run that was left RUNNING by a process that died, as FAILED."""
    MlflowClient().set_terminated(run_id, status="FAILED")


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    """Add metrics to a finished run (the demo's relabel precision, known only to the demo)."""
    client = MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))


def log_training_run(params: dict[str, object], losses: list[float], metrics: dict[str, float]) -> None:
    """A training run's params, its loss per epoch (`train_loss`, step = epoch) and final metrics."""
    mlflow.log_params(params)
    for epoch, loss in enumerate(losses):
        mlflow.log_metric("train_loss", loss, step=epoch)
    mlflow.log_metrics(metrics)
