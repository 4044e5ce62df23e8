"""Prefect flow `audit`: validate a flagged batch, load the model and its training data through
lineage, score every training example against every flagged example, log the findings.

Stages in order: fetch_flagged, validate_flagged, load_model, recover_training_data,
score_queries, build_findings, log_audit.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pandas as pd
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from audit.errors import InvalidFlaggedBatch
from audit.examples import ExampleTable
from audit.findings import influence_table, self_influence_table
from audit.flagged import batch_digest, batch_files, flagged_table, read_batch_file
from audit.influence import influence_scores, self_influence, top_influences
from audit.report import image_grid, png_data, render_report, section
from audit.training import predict_logits
from audit.validation import BatchValidation, validate_flagged_frame
from flows.settings import AuditSettings
from registry_hooks import audit_log
from registry_hooks.lineage import TrainingData, recover_training_data
from registry_hooks.model_io import LoadedModel, ModelSpec, VersionRef, load_version, resolve_version
from registry_hooks.store import use_store
from registry_hooks.tags import RunTags


@dataclass(frozen=True)
class AuditResult:
    """What an audit produced: its MLflow run and the counts a summary needs."""

    run_id: str
    model_name: str
    model_version: str
    n_flagged: int
    n_train: int
    n_candidates: int
    flagged_digest: str


@task(cache_policy=NO_CACHE)
def fetch_flagged(inbox: Path) -> tuple[list[Path], pd.DataFrame]:
    """Read every batch file in the inbox into one frame."""
    files = batch_files(inbox)
    if not files:
        raise InvalidFlaggedBatch(f"The inbox {inbox} holds no Parquet or CSV flagged batch.")
    frames = [read_batch_file(f) for f in files]
    return files, pd.concat(frames, ignore_index=True)


@task(cache_policy=NO_CACHE)
def validate_flagged(files: list[Path], frame: pd.DataFrame, spec: ModelSpec, workdir: Path) -> BatchValidation:
    """Run the Great Expectations suite; on failure move the files to quarantine with the result
    and fail with a sentence naming the failed checks."""
    result = validate_flagged_frame(frame, spec.num_classes, math.prod(spec.input_shape))
    if not result.success:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        quarantine = workdir / "quarantine" / stamp
        quarantine.mkdir(parents=True)
        for f in files:
            shutil.move(str(f), quarantine / f.name)
        (quarantine / "flagged_validation.json").write_text(json.dumps(result.result, indent=2, default=str))
        raise InvalidFlaggedBatch(f"{result.summary()} The batch was moved to {quarantine}.")
    return result


@task(cache_policy=NO_CACHE)
def load_model(ref: VersionRef) -> LoadedModel:
    """Load the registered version's weights from MLflow."""
    return load_version(ref)


@task(cache_policy=NO_CACHE)
def recover_training(run_id: str, spec: ModelSpec) -> TrainingData:
    """Training and validation splits through the model's lineage, digest-checked."""
    return recover_training_data(run_id, spec.input_shape)


@task(cache_policy=NO_CACHE)
def score_queries(model: torch.nn.Module, train: ExampleTable, flagged: ExampleTable, method: str, cache_dir: Path):
    """Influence [Q, N] of every training example on every flagged example, and self-influence [N].
    The fitted curvature is cached in `cache_dir` (keyed by model, data and method), so the
    second call and later audits of the same version reuse it."""
    scores = influence_scores(model, train.dataset(), flagged.dataset(), method=method, cache_dir=cache_dir,
                              progress=False)
    self_scores = self_influence(model, train.dataset(), method=method, cache_dir=cache_dir, progress=False)
    return scores, self_scores


def _proponent_grid(scores: torch.Tensor, flagged: ExampleTable, predicted: torch.Tensor, train: ExampleTable,
                    per_side: int = 4):
    """Figure: per flagged example, itself then its top harmful and top helpful training images."""
    shown = min(len(flagged), 20)
    top = top_influences(scores[:shown], per_side)
    images, captions = [], []
    for q in range(shown):
        images.append(flagged.inputs[q])
        captions.append(f"{int(flagged.labels[q])} (model: {int(predicted[q])})")
        for label, idx in (("-", top.opponents[q]), ("+", top.proponents[q])):
            for i in idx.tolist():
                images.append(train.inputs[i])
                captions.append(f"{label} label {int(train.labels[i])}")
    return image_grid(torch.stack(images), captions, columns=1 + 2 * per_side)


@task(cache_policy=NO_CACHE)
def log_audit(settings: AuditSettings, loaded: LoadedModel, training: TrainingData, frame: pd.DataFrame,
              validation: BatchValidation, flagged: ExampleTable, predicted: torch.Tensor,
              scores: torch.Tensor, self_scores: torch.Tensor) -> AuditResult:
    """Build the findings and log them, with the report, into one MLflow run tagged per DESIGN.md."""
    from audit.correction import propose_corrections

    train = training.train
    influence = influence_table(scores, flagged, predicted, train, settings.top_k)
    self_table = self_influence_table(self_scores, train)
    train_probs = predict_logits(loaded.model, train.inputs).softmax(dim=1)  # [N, C]
    candidates = propose_corrections(scores, train, flagged, predicted, self_scores, k=settings.top_k,
                                     train_probs=train_probs)
    digest = batch_digest(frame)
    tags = RunTags(loaded.name, loaded.version, "audit", digest)
    with mlflow.start_run(run_name=f"audit {loaded.name} v{loaded.version}", tags=tags.to_mlflow()) as run:
        mlflow.log_params({"method": settings.method, "top_k": settings.top_k, "n_flagged": len(flagged),
                           "n_train": len(train), "train_digest": training.digests["train"]})
        mlflow.log_metrics({"n_flagged": len(flagged), "n_candidates": len(candidates),
                            "n_relabel_candidates":
                                int((candidates["action"] == "relabel").sum()) if len(candidates) else 0})
        audit_log.log_tables({"influence": influence, "self_influence": self_table,
                              "correction_candidates": candidates, "flagged": frame})
        audit_log.log_json(validation.result, "flagged_validation.json")
        with tempfile.TemporaryDirectory() as tmp:
            grid = _proponent_grid(scores, flagged, predicted, train)
            grid_path = Path(tmp) / "influence_grid.png"
            grid.savefig(grid_path, dpi=90, bbox_inches="tight")
            report = render_report(
                Path(tmp) / "report.html",
                title=f"Audit of {loaded.name} version {loaded.version}",
                summary=(f"{len(flagged)} flagged mispredictions scored against {len(train)} training examples "
                         f"with method `{settings.method}`; {len(candidates)} correction candidates."),
                sections=[
                    section("Flagged examples and the training examples behind them",
                            "Each row: the flagged image captioned with the reviewer's label (and the model's wrong "
                            "prediction), then its most harmful (-) "
                            "and most helpful (+) training examples.", image=png_data(grid)),
                    section("Correction candidates",
                            "What to change in the training data, one row per training example, with its evidence "
                            "(the flagged examples it harms, its scores and its harmfulness ranks among all "
                            "training examples). relabel: a harmful example labelled as the wrong prediction, "
                            "with the proposed label and why (the reviewer's label, or the model's confident "
                            "prediction when that is more plausible). remove: harmful and labelled as the wrong "
                            "prediction, but no label is plausible. review: check by hand, either because the "
                            "model fits its label although it is harmful, or because its self-influence is "
                            "extreme (unusual for the model, possibly mislabelled). The correct flow applies "
                            "relabels only after re-scoring and logs the ones it used.", table=candidates),
                    section("Most unusual training examples (self-influence)", table=self_table.head(25)),
                    section("Top influences per flagged example", table=influence),
                ],
            )
            audit_log.log_files([report, grid_path])
    return AuditResult(run.info.run_id, loaded.name, loaded.version, len(flagged), len(train), len(candidates), digest)


def _archive(files: list[Path], workdir: Path, run_id: str) -> None:
    """Move audited batch files out of the inbox so the next audit sees only new flags."""
    done = workdir / "processed" / run_id
    done.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.move(str(f), done / f.name)


@flow(name="audit")
def audit(settings: AuditSettings) -> AuditResult:
    """Audit `settings.model_name@settings.alias` against the flagged batch in the inbox."""
    logger = get_run_logger()
    use_store(settings.workdir, tracking=settings.tracking_uri)
    ref = resolve_version(settings.model_name, alias=settings.alias)
    files, frame = fetch_flagged(settings.inbox_path)
    validation = validate_flagged(files, frame, ref.spec, settings.workdir)
    flagged, predicted = flagged_table(frame, ref.spec.input_shape)
    loaded = load_model(ref)
    training = recover_training(ref.run_id, ref.spec)
    scores, self_scores = score_queries(loaded.model, training.train, flagged, settings.method,
                                        settings.workdir / "cache" / "influence")
    result = log_audit(settings, loaded, training, frame, validation, flagged, predicted, scores, self_scores)
    _archive(files, settings.workdir, result.run_id)
    logger.info("audit run %s: %d flagged, %d candidates", result.run_id, result.n_flagged, result.n_candidates)
    return result
