"""Prefect flow `correct`: repair the audited model with a few fine-tuning steps on influential
training examples, evaluate the gates, and register the repair as `challenger` only when every
gate passes.

Stages in order: load_audit, repair, evaluate, log_correction, register.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from audit.correction import CorrectionConfig, RepairResult, influence_horizon, repair_batch
from audit.errors import AuditError
from audit.examples import ExampleTable
from audit.flagged import flagged_table
from audit.gates import GateReport, GateThresholds, evaluate_gates
from flows.settings import CorrectionSettings
from registry_hooks import audit_log
from registry_hooks.lineage import load_label_noise, log_label_noise, log_training_data, recover_training_data
from registry_hooks.model_io import LoadedModel, load_version, log_classifier, resolve_version
from registry_hooks.registry import register_challenger
from registry_hooks.store import use_store


@dataclass(frozen=True)
class CorrectionResult:
    """Outcome of a correction: its run, the gates and the registered version (None if a gate failed)."""

    run_id: str
    gates: GateReport
    registered_version: str | None
    metrics: dict[str, float]

    def failure_reasons(self) -> list[str]:
        return [g.reason for g in self.gates.failed]


@dataclass(frozen=True)
class AuditInputs:
    """What the correction takes from an audit run: the model it audited and its flagged batch."""

    audit_run_id: str
    loaded: LoadedModel
    train: ExampleTable
    validation: ExampleTable
    flagged: ExampleTable
    flagged_digest: str
    label_noise: pd.DataFrame | None


@task(cache_policy=NO_CACHE)
def load_audit(audit_run_id: str) -> AuditInputs:
    """The audited version, its lineage-checked data and the flagged batch logged by the audit."""
    try:
        run = MlflowClient().get_run(audit_run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise AuditError(f"No audit run {audit_run_id} in this MLflow store.") from exc
    tags = run.data.tags
    if tags.get("audit.kind") != "audit":
        raise AuditError(f"Run {audit_run_id} is not an audit run (tag audit.kind={tags.get('audit.kind')!r}).")
    ref = resolve_version(tags["audit.model_name"], version=tags["audit.model_version"])
    training = recover_training_data(ref.run_id, ref.spec.input_shape)
    flagged, _ = flagged_table(audit_log.load_table(audit_run_id, "flagged"), ref.spec.input_shape)
    return AuditInputs(audit_run_id, load_version(ref), training.train, training.validation, flagged,
                       tags["audit.flagged_digest"], load_label_noise(ref.run_id))


@task(cache_policy=NO_CACHE)
def repair(inputs: AuditInputs, config: CorrectionConfig) -> RepairResult:
    """One repaired copy of the model for the whole flagged batch."""
    return repair_batch(inputs.loaded.model, inputs.train, inputs.flagged, config)


@task(cache_policy=NO_CACHE)
def measure_horizon(inputs: AuditInputs, config: CorrectionConfig) -> pd.DataFrame:
    """How well influence predicts the query-loss change after s fine-tuning steps (s = 1..32):
    one row per s with Pearson/Spearman over (flagged query, training subset) pairs."""
    return influence_horizon(inputs.loaded.model, inputs.train, inputs.flagged, config)


def log_horizon(horizon: pd.DataFrame) -> None:
    """Metrics `horizon_pearson` / `horizon_spearman` with MLflow step = fine-tuning steps, the
    table, and a plot a reviewer reads next to gates.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for row in horizon.itertuples(index=False):
        mlflow.log_metrics({"horizon_pearson": float(row.pearson), "horizon_spearman": float(row.spearman)},
                           step=int(row.steps))
    audit_log.log_tables({"influence_horizon": horizon}, artifact_dir="correction")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(horizon["steps"], horizon["pearson"], marker="o", label="Pearson")
    ax.plot(horizon["steps"], horizon["spearman"], marker="s", label="Spearman")
    ax.set(xscale="log", xlabel="fine-tuning steps", ylabel="correlation (predicted vs actual loss change)",
           ylim=(-1, 1), title="How far the influence estimate holds")
    ax.set_xticks(list(horizon["steps"]), [str(v) for v in horizon["steps"]])
    ax.legend()
    mlflow.log_figure(fig, "correction/influence_horizon.png")
    plt.close(fig)


@task(cache_policy=NO_CACHE)
def evaluate(inputs: AuditInputs, repaired: RepairResult, thresholds: GateThresholds, onnx_path: Path) -> GateReport:
    """Every gate, champion vs repair. The canary sample is the validation split: the gates count
    only the inputs the champion gets right."""
    return evaluate_gates(inputs.loaded.model, repaired.model, inputs.flagged, inputs.validation, inputs.validation,
                          inputs.loaded.spec.num_classes, thresholds, onnx_path)


def relabel_precision(relabels: dict[str, int], noise: pd.DataFrame) -> float | None:
    """Fraction of applied relabels that restore a flipped label to its clean value (demo only)."""
    if not relabels:
        return None
    clean = dict(zip(noise["example_id"], noise["clean_label"]))
    noisy = dict(zip(noise["example_id"], noise["noisy_label"]))
    hits = sum(1 for i, y in relabels.items() if clean[i] != noisy[i] and clean[i] == y)
    return hits / len(relabels)


def relabelled(train: ExampleTable, relabels: dict[str, int]) -> ExampleTable:
    """The training table with the repair's relabels applied (the corrected model's lineage)."""
    labels = train.labels.clone()
    position = {i: n for n, i in enumerate(train.ids)}
    for example_id, label in relabels.items():
        labels[position[example_id]] = label
    return train.with_labels(labels)


@flow(name="correct")
def correct(settings: CorrectionSettings, audit_run_id: str, config: CorrectionConfig | None = None) -> CorrectionResult:
    """Repair the model an audit run looked at, gate it, and register it as `challenger` if every
    gate passes (gates.json is logged before any registry call)."""
    logger = get_run_logger()
    use_store(settings.workdir, tracking=settings.tracking_uri)
    config = config or CorrectionConfig(target_fix_rate=settings.min_fix_rate or None)
    thresholds = GateThresholds(min_fix_rate=settings.min_fix_rate,
                                max_accuracy_drop_points=settings.max_accuracy_drop_points)
    inputs = load_audit(audit_run_id)
    loaded = inputs.loaded
    repaired = repair(inputs, config)
    horizon = measure_horizon(inputs, config)
    tags = audit_log.audit_tags(loaded.name, loaded.version, "correction", inputs.flagged_digest)
    tags["audit.audit_run_id"] = audit_run_id
    with mlflow.start_run(run_name=f"correct {loaded.name} v{loaded.version}", tags=tags) as run:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            gates = evaluate(inputs, repaired, thresholds, onnx_path)
            if onnx_path.exists():
                mlflow.log_artifact(str(onnx_path), artifact_path="onnx")
        metrics = gates.metrics()
        noise_precision = relabel_precision(repaired.relabels, inputs.label_noise) if inputs.label_noise is not None else None
        if noise_precision is not None:
            metrics["relabel_precision"] = noise_precision
        metrics.update({"steps_taken": repaired.steps_taken, "rounds": repaired.rounds, "n_relabels": len(repaired.relabels)})
        mlflow.log_params({f"correction.{k}": v for k, v in vars(config).items()})
        log_horizon(horizon)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        audit_log.log_json(gates.to_dict(), "gates.json", artifact_dir="correction")
        audit_log.log_tables({"relabels": pd.DataFrame({"train_id": list(repaired.relabels),
                                                        "proposed_label": list(repaired.relabels.values())}),
                              "history": pd.DataFrame(list(repaired.history))}, artifact_dir="correction")
        version = None
        if gates.passed:
            log_training_data(relabelled(inputs.train, repaired.relabels), inputs.validation)
            if inputs.label_noise is not None:
                log_label_noise(tuple(inputs.label_noise["example_id"]), inputs.label_noise["clean_label"],
                                inputs.label_noise["noisy_label"])
            uri = log_classifier(repaired.model, loaded.spec)
            version = register_challenger(uri, loaded.name, loaded.version, audit_run_id)
            logger.info("registered %s version %s as challenger", loaded.name, version)
        else:
            for gate in gates.failed:
                logger.warning("gate %s failed: %s", gate.name, gate.reason)
    return CorrectionResult(run.info.run_id, gates, version, metrics)
