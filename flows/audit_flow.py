"""Prefect flow `audit`: validate a flagged batch, load the model and its training data through
lineage, score every training example against every flagged example, log the findings.

Stages in order: recover_claims (batches of runs that died), claim (the inbox's batch, renamed
into a claim folder so no other run reads it), fetch_flagged, validate_flagged, load_model, recover_training_data,
score_queries, build (audit.findings.build_findings), log_audit.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from audit.audit_report import audit_verdict, render_audit_report, suspects_table
from audit.errors import EmptyInbox, InvalidFlaggedBatch
from audit.examples import ExampleTable
from audit.findings import AuditFindings, build_findings
from audit.flagged import batch_digest, flagged_table, read_batch
from audit.inbox import claim_batch, claim_digest, claimed_files, move_files, recovery_for, requeue, stale_claims
from audit.influence.index.cluster import ShardMap, shard_map
from audit.scoring import FlaggedScores, score_flagged
from audit.validation import BatchValidation, validate_flagged_frame
from audit.verdict import StoreArgs, Verdict
from flows.artifacts import publish_outcome
from flows.settings import AuditSettings, StoreSettings
from registry_hooks import audit_log
from registry_hooks.lineage import TrainingData, recover_training_data
from registry_hooks.model_io import (
    LoadedModel,
    ModelSpec,
    VersionRef,
    load_version,
    require_pickle_opt_in,
    resolve_version,
)
from registry_hooks.store import use_store
from registry_hooks.tags import RunTags


@dataclass(frozen=True)
class AuditResult:
    """What an audit produced: its MLflow run, the counts a summary needs and its verdict."""

    run_id: str
    model_name: str
    model_version: str
    n_flagged: int
    n_train: int
    n_candidates: int
    flagged_digest: str
    verdict: Verdict


@task(cache_policy=NO_CACHE)
def recover_claims(settings: AuditSettings, workdir: Path, spec: ModelSpec) -> None:
    """Hand back the batches of runs that died holding a claim (audit.inbox.recovery_for)."""
    for claim in stale_claims(workdir / "claims", settings.claim_timeout_s):
        digest = claim_digest(claim, spec.modality)  # None: unreadable, the next run quarantines it
        recovery = recovery_for(audit_log.audit_runs_for_batch(digest) if digest else {})
        for run_id in recovery.mark_failed:
            audit_log.mark_failed(run_id)
        if recovery.archive_under:
            move_files(claimed_files(claim), workdir / "processed" / recovery.archive_under)
        else:
            requeue(claim, settings.inbox_in(workdir))


@task(cache_policy=NO_CACHE)
def claim(inbox: Path, workdir: Path, claim_id: str) -> list[Path]:
    """This run's batch, moved out of the inbox before anything reads it; EmptyInbox when there is
    none, or another run claimed it first."""
    files = claim_batch(inbox, workdir / "claims", claim_id)
    if not files:
        raise EmptyInbox(f"The inbox {inbox} holds no Parquet or CSV flagged batch to claim.")
    return files


@task(cache_policy=NO_CACHE)
def fetch_flagged(files: list[Path], workdir: Path, max_rows: int) -> pd.DataFrame:
    """Read the claimed batch files into one frame; a file that cannot be read, or a batch over
    `max_rows` (counted before loading), sends the whole batch to quarantine, like a failed
    validation, so it cannot block later runs."""
    try:
        return read_batch(files, max_rows)
    except InvalidFlaggedBatch as exc:
        folder = quarantine(files, workdir, {"success": False, "error": str(exc)})
        raise InvalidFlaggedBatch(f"{exc} The batch was moved to {folder}.") from None


@task(cache_policy=NO_CACHE)
def validate_flagged(files: list[Path], frame: pd.DataFrame, spec: ModelSpec, workdir: Path,
                     max_rows: int, image_root: Path | None) -> BatchValidation:
    """Run the Great Expectations suite (at most `max_rows` rows, the input checks of the model's
    modality: e.g. pixels in its training range when its spec records one); on failure move the
    files to quarantine with the result and fail with a sentence naming the failed checks."""
    result = validate_flagged_frame(frame, spec.num_classes, spec.modality, max_rows=max_rows,
                                    input_range=spec.input_range, root=image_root)
    if not result.success:
        folder = quarantine(files, workdir, result.result)
        raise InvalidFlaggedBatch(f"{result.summary()} The batch was moved to {folder}.")
    return result


def quarantine(files: list[Path], workdir: Path, outcome: dict) -> Path:
    """Move a refused batch's files to `<workdir>/quarantine/<stamp>/` with `flagged_validation.json`."""
    folder = move_files(files, workdir / "quarantine" / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ"))
    (folder / "flagged_validation.json").write_text(json.dumps(outcome, indent=2, default=str))
    return folder


@task(cache_policy=NO_CACHE)
def load_model(ref: VersionRef, allow_pickle: bool) -> LoadedModel:
    """Load the registered version's weights from MLflow (unpickling only if `allow_pickle`)."""
    return load_version(ref, allow_pickle=allow_pickle)


@task(cache_policy=NO_CACHE)
def recover_training(run_id: str, spec: ModelSpec) -> TrainingData:
    """Training and validation splits through the model's lineage, digest-checked."""
    return recover_training_data(run_id, spec)


@task(cache_policy=NO_CACHE)
def score_queries(loaded: LoadedModel, train: ExampleTable, flagged: ExampleTable, method: str, cache_dir: Path,
                  progress: bool, run: ShardMap) -> FlaggedScores:
    """Influence [Q, N] of every training example on every flagged example, and self-influence [N].
    What later audits of the same version reuse (fitted curvature, gradient index) is kept in
    `cache_dir`, keyed by model, data and options. `progress`: bars on stderr. `run`: where the
    index's shard jobs run."""
    return score_flagged(loaded.model, train, flagged, method, cache_dir, progress,
                         metadata={"model_name": loaded.name, "model_version": loaded.version}, shard_map=run)


@task(cache_policy=NO_CACHE)
def build(loaded: LoadedModel, training: TrainingData, flagged: ExampleTable, predicted: torch.Tensor,
          scored: FlaggedScores, top_k: int) -> AuditFindings:
    """The findings: influence and self-influence tables and the correction candidates."""
    return build_findings(loaded.model, loaded.name, loaded.version, scored.method, training.train, flagged,
                          predicted, scored.scores, scored.self_scores, top_k)


@task(cache_policy=NO_CACHE)
def log_audit(settings: AuditSettings, findings: AuditFindings, training: TrainingData, frame: pd.DataFrame,
              digest: str, validation: BatchValidation, store: StoreSettings, index: dict | None) -> AuditResult:
    """One MLflow run tagged per DESIGN.md with the findings, the report and the audited batch
    (`frame`, its files embedded), tagged with `digest`, the claimed batch's as the inbox read it;
    `index`: the gradient index the scores came from (GradientIndex.describe()), if any."""
    tags = RunTags(findings.model_name, findings.model_version, "audit", digest)
    params = {"method": findings.method, "method_requested": settings.method, "top_k": settings.top_k,
              "scale_out": settings.scale_out(),
              "n_flagged": len(findings.flagged),
              "n_train": len(findings.train), "train_digest": training.digests["train"],
              **audit_log.index_params(index)}
    with audit_log.mlflow_run(f"audit {findings.model_name} v{findings.model_version}", tags) as run_id, \
            tempfile.TemporaryDirectory() as tmp:
        verdict = audit_verdict(findings, run_id, StoreArgs(store.workdir, store.tracking_uri, store.allow_pickle))
        files = render_audit_report(Path(tmp), findings, verdict)
        audit_log.log_audit(findings, params, frame, validation.result, list(files))
    return AuditResult(run_id, findings.model_name, findings.model_version, len(findings.flagged),
                       len(findings.train), len(findings.candidates), digest, verdict)


@flow(name="audit")
def audit(store: StoreSettings, settings: AuditSettings) -> AuditResult:
    """Audit `settings.model_name@settings.alias` in `store` against the flagged batch in the inbox."""
    logger = get_run_logger()
    use_store(store.workdir, tracking=store.tracking_uri)
    ref = resolve_version(settings.model_name, alias=settings.alias)
    require_pickle_opt_in(ref, store.allow_pickle)  # before the claim: a refused run leaves the batch in the inbox
    recover_claims(settings, store.workdir, ref.spec)
    files = claim(settings.inbox_in(store.workdir), store.workdir, flow_run.get_id() or uuid.uuid4().hex)
    frame = fetch_flagged(files, store.workdir, settings.max_flagged)
    validation = validate_flagged(files, frame, ref.spec, store.workdir, settings.max_flagged, settings.image_root)
    digest = batch_digest(frame, ref.spec.modality)  # of the batch as claimed: what recovering a claim compares
    frame = ref.spec.modality.embed_files(frame, settings.image_root)  # the logged batch needs no image root
    loaded = load_model(ref, store.allow_pickle)
    flagged, predicted = flagged_table(frame, loaded.spec.table)  # after loading: text needs its tokenizer
    training = recover_training(ref.run_id, loaded.spec)  # text data is tokenized with the loaded tokenizer
    # the findings read the index's scores block by block: the cluster stays up until they are built
    with shard_map(settings.dask_address, settings.workers) as run:
        scored = score_queries(loaded, training.train, flagged, settings.method,
                               store.workdir / "cache" / "influence", settings.progress, run)
        findings = build(loaded, training, flagged, predicted, scored, settings.top_k)
    result = log_audit(settings, findings, training, frame, digest, validation, store, scored.index)
    move_files(files, store.workdir / "processed" / result.run_id)
    publish_outcome("audit", f"Audit of {result.model_name} version {result.model_version}", result.verdict,
                    audit_log.run_links(result.run_id, "audit/report.html"), suspects_table(findings.candidates))
    logger.info("audit run %s: %d flagged, %d candidates", result.run_id, result.n_flagged, result.n_candidates)
    return result
