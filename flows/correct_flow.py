"""Prefect flow `correct`: search for a repair of the audited model (a few fine-tuning steps on
influential training examples, several candidates), gate the chosen one, and register it as
`challenger` only when every gate passes.

Stages in order: load_audit, frozen_features (the model's trainable head and the frozen part's
features, when the rest is frozen: every later step but the gates then runs the head only),
measure_horizon (which caps the repair's steps per round at the
horizon the influence estimate holds for), search (candidates compared on a selection split of
the validation data), evaluate (every gate, on the rest of it), log (metrics, candidates,
gates.json, report.html), register.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from audit.correction import (
    CorrectionConfig,
    RepairCandidate,
    RepairResult,
    SearchResult,
    influence_horizon,
    search_repairs,
    selection_split,
    trusted_steps,
)
from audit.correction.evidence import prediction_changes
from audit.correction.report import (
    CorrectionFindings,
    correction_metrics,
    correction_params,
    correction_verdict,
    failure_reasons,
    render_correction_report,
)
from audit.examples import ExampleTable
from audit.flagged import flagged_table
from audit.frozen_features import FrozenFeatures, split_frozen
from audit.gates import GateReport, GateThresholds, evaluate_gates
from audit.verdict import StoreArgs, Verdict
from flows.artifacts import publish_outcome
from flows.settings import CorrectionSettings, StoreSettings
from registry_hooks import audit_log
from registry_hooks.lineage import log_derived_training_data, recover_training_data
from registry_hooks.model_io import LoadedModel, load_version, log_classifier, resolve_version
from registry_hooks.registry import refuse_if_corrected, register_challenger
from registry_hooks.store import use_store
from registry_hooks.tags import RunTags


@dataclass(frozen=True)
class CorrectionResult:
    """Outcome of a correction: its run, the repair search, the gates of the chosen candidate on
    the gate split (None when no candidate passed selection) and the registered version (None
    unless every gate passed)."""

    run_id: str
    search: SearchResult
    gates: GateReport | None
    registered_version: str | None
    metrics: dict[str, float]
    verdict: Verdict

    def failure_reasons(self) -> list[str]:
        """Why nothing was registered (audit.correction.report.failure_reasons)."""
        return failure_reasons(self.search, self.gates)


@dataclass(frozen=True)
class AuditInputs:
    """What the correction takes from an audit run: the model it audited, its flagged batch, the
    correction candidates it proposed and the influence method it scored with."""

    audit_run_id: str
    loaded: LoadedModel
    train: ExampleTable
    validation: ExampleTable
    flagged: ExampleTable
    flagged_digest: str
    candidates: pd.DataFrame
    method: str


@task(cache_policy=NO_CACHE)
def load_audit(audit_run_id: str, allow_pickle: bool) -> AuditInputs:
    """The audited version, its lineage-checked data and the flagged batch logged by the audit."""
    tags = audit_log.finished_audit(audit_run_id)
    refuse_if_corrected(tags.model_name, audit_run_id)  # before any work; register_challenger checks again
    ref = resolve_version(tags.model_name, version=tags.model_version)
    loaded = load_version(ref, allow_pickle=allow_pickle)  # without the opt-in, refused before any data is read
    training = recover_training_data(ref.run_id, loaded.spec)
    flagged, _ = flagged_table(audit_log.load_table(audit_run_id, "flagged"), loaded.spec.table)
    return AuditInputs(audit_run_id, loaded, training.train, training.validation, flagged,
                       tags.flagged_digest, audit_log.load_table(audit_run_id, "correction_candidates"),
                       audit_log.run_params(audit_run_id).get("method", "unknown"))


@task(cache_policy=NO_CACHE)
def frozen_features(inputs: AuditInputs) -> tuple[AuditInputs, FrozenFeatures]:
    """What the horizon and the search work on: when the model's trainable parameters all sit in
    its head, the head and the training and flagged tables as the frozen part's features, computed
    once (audit.frozen_features); else the inputs themselves. The search takes the selection split's
    features (`FrozenFeatures.table`); the gates run on the whole model."""
    frozen = split_frozen(inputs.loaded.model, inputs.train.inputs)
    get_run_logger().info("repairs run on the %s", frozen.description)
    work = dataclasses.replace(inputs, loaded=dataclasses.replace(inputs.loaded, model=frozen.head),
                               train=frozen.table(inputs.train), flagged=frozen.table(inputs.flagged))
    return work, frozen


@task(cache_policy=NO_CACHE)
def search(work: AuditInputs, frozen: FrozenFeatures, selection: ExampleTable, thresholds: GateThresholds,
           candidates: tuple[RepairCandidate, ...], max_steps: int, progress: bool) -> SearchResult:
    """Every candidate repair of the whole flagged batch, gated on the selection split; the chosen
    one comes back as the whole model."""
    searched = search_repairs(work.loaded.model, work.train, work.flagged, frozen.table(selection),
                              work.loaded.spec.num_classes, thresholds, candidates, max_steps, progress)
    return searched.with_full_model(frozen.full_model)


@task(cache_policy=NO_CACHE)
def measure_horizon(work: AuditInputs, config: CorrectionConfig) -> pd.DataFrame:
    """How well influence predicts the query-loss change after s fine-tuning steps (s = 1..32):
    one row per s with Pearson/Spearman over (flagged query, training subset) pairs."""
    return influence_horizon(work.loaded.model, work.train, work.flagged, config)


@task(cache_policy=NO_CACHE)
def evaluate(inputs: AuditInputs, repaired: RepairResult, gate_split: ExampleTable, thresholds: GateThresholds,
             onnx_path: Path) -> GateReport:
    """Every gate, champion vs repair, on the gate split. It is also the canary sample: the canary
    gate counts only the inputs the champion gets right."""
    return evaluate_gates(inputs.loaded.model, repaired.model, inputs.flagged, gate_split, gate_split,
                          inputs.loaded.spec.num_classes, thresholds, onnx_path)


@task(cache_policy=NO_CACHE)
def compare_predictions(inputs: AuditInputs, repaired: RepairResult, gate_split: ExampleTable) -> pd.DataFrame:
    """The gate-split examples whose prediction the repair changed (the gates' evidence)."""
    return prediction_changes(inputs.loaded.model, repaired.model, gate_split)


@task(cache_policy=NO_CACHE)
def log_correction(findings: CorrectionFindings, settings: CorrectionSettings,
                   onnx_path: Path, store: StoreSettings) -> tuple[dict[str, float], Verdict]:
    """Metrics, params, tables, gates.json, the horizon plot and report.html, before any registry
    call; returns the metrics logged and the verdict."""
    verdict = correction_verdict(findings, StoreArgs(store.workdir, store.tracking_uri, store.allow_pickle))
    files = render_correction_report(onnx_path.parent, findings, verdict)
    metrics = correction_metrics(findings)
    audit_log.log_correction(findings, metrics, correction_params(findings, settings.selection_fraction),
                             list(files), onnx_path)
    return metrics, verdict


@task(cache_policy=NO_CACHE)
def register(inputs: AuditInputs, repaired: RepairResult) -> str:
    """Log the repaired model with its lineage (the audited version's data by reference plus the
    repair's label edits) and register it as challenger."""
    log_derived_training_data(inputs.loaded.run_id, repaired.relabels)
    uri = log_classifier(repaired.model, inputs.loaded.spec)
    return register_challenger(uri, inputs.loaded.name, inputs.loaded.version, inputs.audit_run_id)


@flow(name="correct")
def correct(store: StoreSettings, settings: CorrectionSettings, audit_run_id: str,
            candidates: tuple[RepairCandidate, ...] | None = None) -> CorrectionResult:
    """Search for a repair of the model an audit run looked at, gate the chosen candidate, and
    register it as `challenger` if every gate passes (the candidates table, gates.json and
    report.html are logged before any registry call), all in `store`. `candidates` replaces the
    settings' named ones (Python callers); the settings' strategy and method apply to either."""
    logger = get_run_logger()
    use_store(store.workdir, tracking=store.tracking_uri)
    candidates = settings.repair_candidates(candidates)
    thresholds = settings.thresholds()
    inputs = load_audit(audit_run_id, store.allow_pickle)
    work, frozen = frozen_features(inputs)
    horizon = measure_horizon(work, candidates[0].config)
    # re-score before the influence estimate goes stale (Schioppa et al. 2023)
    budget = trusted_steps(horizon, settings.min_horizon_correlation)
    selection, gate_split = selection_split(inputs.validation, settings.selection_fraction)
    searched = search(work, frozen, selection, thresholds, candidates, budget, settings.progress)
    chosen = searched.chosen
    loaded = inputs.loaded
    tags = RunTags(loaded.name, loaded.version, "correction", inputs.flagged_digest, audit_run_id)
    with audit_log.mlflow_run(f"correct {loaded.name} v{loaded.version}", tags) as run_id:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            gates = evaluate(inputs, chosen.repair, gate_split, thresholds, onnx_path) if chosen else None
            changes = compare_predictions(inputs, chosen.repair, gate_split) if chosen else None
            findings = CorrectionFindings(loaded.name, loaded.version, audit_run_id, len(inputs.flagged), searched,
                                          gates, horizon, budget, settings.min_horizon_correlation,
                                          (len(selection), len(gate_split)), inputs.train, gate_split,
                                          inputs.candidates, inputs.method, changes)
            metrics, verdict = log_correction(findings, settings, onnx_path, store)
        version = register(inputs, chosen.repair) if findings.passed else None
    publish_outcome("correction", f"Correction of {loaded.name} version {loaded.version}", verdict,
                    audit_log.run_links(run_id, "correction/report.html"), findings.tables["candidates"])
    for reason in failure_reasons(searched, gates) if version is None else []:
        logger.warning("not registered: %s", reason)
    if version is not None:
        logger.info("registered %s version %s as challenger (candidate %s)", loaded.name, version,
                    chosen.candidate.name)
    return CorrectionResult(run_id, searched, gates, version, metrics, verdict)
