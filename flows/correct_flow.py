"""Prefect flow `correct`: search for a repair of the audited model (a few fine-tuning steps on
influential training examples, several candidates), gate the chosen one, and register it as
`challenger` only when every gate passes.

Stages in order: load_audit, measure_horizon (which caps the repair's steps per round at the
horizon the influence estimate holds for), search (candidates compared on a selection split of
the validation data), evaluate (every gate, on the rest of it), log (metrics, candidates,
gates.json, report.html), register.
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
from audit.errors import AuditError
from audit.examples import ExampleTable
from audit.flagged import flagged_table
from audit.gates import GateReport, GateThresholds, evaluate_gates
from audit.report import png_data, render_report, section
from flows.settings import CorrectionSettings
from registry_hooks import audit_log
from registry_hooks import tags as tag_keys
from registry_hooks.lineage import load_label_noise, log_label_noise, log_training_data, recover_training_data
from registry_hooks.model_io import LoadedModel, load_version, log_classifier, resolve_version
from registry_hooks.registry import register_challenger
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

    def failure_reasons(self) -> list[str]:
        """Why nothing was registered: the chosen candidate's failed gates, or every candidate's."""
        if self.gates is None:
            return ["no repair candidate passed the gates on the selection split ("
                    + " | ".join(self.search.failures()) + ")"]
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
    tags = RunTags.from_mlflow(run.data.tags, audit_run_id)
    if tags.kind != "audit":
        raise AuditError(f"Run {audit_run_id} is not an audit run (it is a {tags.kind} run).")
    if run.info.status != "FINISHED":
        # an audit that died after it started logging has partial artifacts: never repair from it
        raise AuditError(f"Audit run {audit_run_id} is {run.info.status}, not FINISHED; only a completed audit "
                         "can be corrected (re-run the audit).")
    ref = resolve_version(tags.model_name, version=tags.model_version)
    training = recover_training_data(ref.run_id, ref.spec.input_shape)
    flagged, _ = flagged_table(audit_log.load_table(audit_run_id, "flagged"), ref.spec.input_shape)
    return AuditInputs(audit_run_id, load_version(ref), training.train, training.validation, flagged,
                       tags.flagged_digest, load_label_noise(ref.run_id))


@task(cache_policy=NO_CACHE)
def search(inputs: AuditInputs, selection: ExampleTable, thresholds: GateThresholds,
           candidates: tuple[RepairCandidate, ...], max_steps: int) -> SearchResult:
    """Every candidate repair of the whole flagged batch, gated on the selection split."""
    return search_repairs(inputs.loaded.model, inputs.train, inputs.flagged, selection,
                          inputs.loaded.spec.num_classes, thresholds, candidates, max_steps)


@task(cache_policy=NO_CACHE)
def measure_horizon(inputs: AuditInputs, config: CorrectionConfig) -> pd.DataFrame:
    """How well influence predicts the query-loss change after s fine-tuning steps (s = 1..32):
    one row per s with Pearson/Spearman over (flagged query, training subset) pairs."""
    return influence_horizon(inputs.loaded.model, inputs.train, inputs.flagged, config)


def log_horizon(horizon: pd.DataFrame) -> str:
    """Metrics `horizon_pearson` / `horizon_spearman` with MLflow step = fine-tuning steps, the
    table, and a plot a reviewer reads next to gates.json; returns the plot as base64 PNG."""
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
    image = png_data(fig)
    plt.close(fig)
    return image


def correction_report(path: Path, inputs: AuditInputs, result: CorrectionResult, sizes: tuple[int, int],
                      tables: dict[str, pd.DataFrame], horizon: pd.DataFrame, horizon_png: str, budget: int,
                      min_correlation: float) -> Path:
    """report.html of a correction run: the verdict, the repair candidates tried, every gate of
    the chosen one, the influence horizon and the step budget taken from it, the rounds, and the
    label edits. `tables` are the logged `candidates`, `relabels` and `history` tables; `sizes`
    (selection, gate split) the validation examples on each side."""
    loaded, gates, chosen = inputs.loaded, result.gates, result.search.chosen
    if gates is not None and gates.passed:
        verdict = f"Every gate passed: candidate `{chosen.candidate.name}` is registered as challenger."
    else:
        verdict = "Not registered: " + "; ".join(result.failure_reasons()) + "."
    edits = tables["relabels"].copy()
    if len(edits):
        current = dict(zip(inputs.train.ids, inputs.train.labels.tolist(), strict=True))
        edits.insert(1, "current_label", [current[i] for i in edits["train_id"]])
    sections = [section(
        "Repair candidates",
        f"Each candidate repaired a copy of the model and was gated on a selection split of {sizes[0]} validation "
        f"examples; the gates below use the other {sizes[1]}, which no candidate was chosen on. The chosen "
        "candidate passes every selection gate with the highest fix rate (earliest on ties).",
        table=tables["candidates"])]
    if gates is not None:
        gate_table = pd.DataFrame([{"gate": g.name, "before": g.before, "after": g.after, "threshold": g.threshold,
                                    "passed": g.passed, "reason": g.reason} for g in gates.results])
        sections.append(section("Gates", f"Champion (before) vs candidate `{chosen.candidate.name}` (after) on the "
                                         "flagged batch and on the gate split of the validation data.",
                                table=gate_table))
    summary = f"{len(result.search.outcomes)} repair candidate(s) tried on {len(inputs.flagged)} flagged examples. "
    if chosen is not None:
        config, repaired = chosen.candidate.config, chosen.repair
        summary += (f"Chosen: `{chosen.candidate.name}` (strategy `{config.strategy}`, influence method "
                    f"`{config.method}`): {repaired.rounds} round(s), {repaired.steps_taken} fine-tuning steps, "
                    f"{len(repaired.relabels)} label edits. ")
    return render_report(
        path, title=f"Correction of {loaded.name} version {loaded.version}", summary=summary + verdict,
        sections=sections + [
            section("Influence horizon",
                    f"For each sampled flagged example, training subsets were fine-tuned on for s steps and the "
                    f"actual change of its loss compared with the change influence predicted. The repair takes "
                    f"at most {budget} steps between re-scorings: the longest horizon whose Pearson correlation "
                    f"stays at or above {min_correlation}.", table=horizon, image=horizon_png),
            section("Rounds of the chosen candidate", "Each round re-scores the still-wrong flagged examples and "
                    "fine-tunes on the training examples it selects (plus a replay sample).", table=tables["history"]),
            section("Label edits of the chosen candidate", table=edits),
        ],
    )


@task(cache_policy=NO_CACHE)
def evaluate(inputs: AuditInputs, repaired: RepairResult, gate_split: ExampleTable, thresholds: GateThresholds,
             onnx_path: Path) -> GateReport:
    """Every gate, champion vs repair, on the gate split. It is also the canary sample: the canary
    gate counts only the inputs the champion gets right."""
    return evaluate_gates(inputs.loaded.model, repaired.model, inputs.flagged, gate_split, gate_split,
                          inputs.loaded.spec.num_classes, thresholds, onnx_path)


def correction_tables(searched: SearchResult) -> dict[str, pd.DataFrame]:
    """The logged tables: every candidate tried, and the chosen one's label edits and rounds
    (empty when none was chosen)."""
    repaired = searched.chosen.repair if searched.chosen else None
    relabels = repaired.relabels if repaired else {}
    return {"candidates": searched.table(),
            "relabels": pd.DataFrame({"train_id": list(relabels), "proposed_label": list(relabels.values())}),
            "history": pd.DataFrame(list(repaired.history) if repaired else [])}


def relabel_precision(relabels: dict[str, int], noise: pd.DataFrame) -> float | None:
    """Fraction of applied relabels that restore a flipped label to its clean value (demo only)."""
    if not relabels:
        return None
    clean = dict(zip(noise["example_id"], noise["clean_label"], strict=True))
    noisy = dict(zip(noise["example_id"], noise["noisy_label"], strict=True))
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
def correct(settings: CorrectionSettings, audit_run_id: str,
            candidates: tuple[RepairCandidate, ...] | None = None) -> CorrectionResult:
    """Search for a repair of the model an audit run looked at, gate the chosen candidate, and
    register it as `challenger` if every gate passes (the candidates table, gates.json and
    report.html are logged before any registry call). `candidates` replaces the settings' named
    ones (Python callers)."""
    logger = get_run_logger()
    use_store(settings.workdir, tracking=settings.tracking_uri)
    candidates = candidates or settings.repair_candidates()
    thresholds = settings.thresholds()
    inputs = load_audit(audit_run_id)
    loaded = inputs.loaded
    horizon = measure_horizon(inputs, candidates[0].config)
    budget = trusted_steps(horizon, settings.min_horizon_correlation)
    selection, gate_split = selection_split(inputs.validation, settings.selection_fraction)
    # re-score before the influence estimate goes stale (Schioppa et al. 2023)
    searched = search(inputs, selection, thresholds, candidates, budget)
    chosen = searched.chosen
    tags = RunTags(loaded.name, loaded.version, "correction", inputs.flagged_digest, audit_run_id)
    with mlflow.start_run(run_name=f"correct {loaded.name} v{loaded.version}", tags=tags.to_mlflow()) as run:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            gates = evaluate(inputs, chosen.repair, gate_split, thresholds, onnx_path) if chosen else None
            if onnx_path.exists():
                mlflow.log_artifact(str(onnx_path), artifact_path="onnx")
            metrics = gates.metrics() if gates else {}
            metrics.update({"candidates_tried": len(searched.outcomes), "step_budget": budget,
                            "candidates_passed_selection": sum(o.selection.passed for o in searched.outcomes)})
            if chosen:
                repaired = chosen.repair
                if inputs.label_noise is not None and repaired.relabels:
                    metrics["relabel_precision"] = relabel_precision(repaired.relabels, inputs.label_noise)
                metrics.update({"steps_taken": repaired.steps_taken, "rounds": repaired.rounds,
                                "n_relabels": len(repaired.relabels)})
                mlflow.log_params({f"correction.{k}": v for k, v in vars(chosen.candidate.config).items()})
            mlflow.log_params({"correction.candidate": chosen.candidate.name if chosen else "none",
                               "correction.selection_fraction": settings.selection_fraction})
            horizon_png = log_horizon(horizon)
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
            if gates:
                audit_log.log_json(gates.to_dict(), "gates.json", artifact_dir="correction")
            tables = correction_tables(searched)
            audit_log.log_tables(tables, artifact_dir="correction")
            passed = bool(gates and gates.passed)
            mlflow.set_tag(tag_keys.GATES, tag_keys.GATES_PASSED if passed else tag_keys.GATES_FAILED)
            result = CorrectionResult(run.info.run_id, searched, gates, None, metrics)
            report = correction_report(Path(tmp) / "report.html", inputs, result, (len(selection), len(gate_split)),
                                       tables, horizon, horizon_png, budget, settings.min_horizon_correlation)
            audit_log.log_files([report], artifact_dir="correction")
        version = None
        if passed:
            repaired = chosen.repair
            log_training_data(relabelled(inputs.train, repaired.relabels), inputs.validation)
            if inputs.label_noise is not None:
                log_label_noise(tuple(inputs.label_noise["example_id"]), inputs.label_noise["clean_label"],
                                inputs.label_noise["noisy_label"])
            uri = log_classifier(repaired.model, loaded.spec)
            version = register_challenger(uri, loaded.name, loaded.version, audit_run_id)
            logger.info("registered %s version %s as challenger (candidate %s)", loaded.name, version,
                        chosen.candidate.name)
        else:
            for reason in result.failure_reasons():
                logger.warning("not registered: %s", reason)
    return CorrectionResult(run.info.run_id, searched, gates, version, metrics)
