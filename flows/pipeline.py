"""Prefect flow `audit-and-correct`: what schedules and registry events run.

It audits the model version an alias points to against whatever flagged batches wait in the
inbox, then repairs it behind the gates (registering `challenger` only if every gate passes).
An empty inbox is the normal case for a scheduled run, so it ends the flow without a run.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, get_run_logger

from audit.errors import EmptyInbox
from audit.flagged import batch_files
from flows.audit_flow import audit
from flows.correct_flow import correct
from flows.settings import AuditSettings, CorrectionSettings, StoreSettings


@dataclass(frozen=True)
class PipelineResult:
    """The audit run, the correction run that followed it, and the version the correction
    registered as `challenger` (None when a gate failed)."""

    audit_run_id: str
    correction_run_id: str
    registered_version: str | None


@flow(name="audit-and-correct")
def audit_and_correct(store: StoreSettings, audit_settings: AuditSettings,
                      correction_settings: CorrectionSettings) -> PipelineResult | None:
    """Audit `audit_settings.model_name@alias` in `store` against the inbox and repair it there;
    None (and no MLflow run) when the inbox holds no flagged batch."""
    logger = get_run_logger()
    inbox = audit_settings.inbox_in(store.workdir)
    if not batch_files(inbox):
        logger.info("inbox %s holds no flagged batch: nothing to audit", inbox)
        return None
    try:
        audited = audit(store, audit_settings)
    except EmptyInbox:  # another run claimed the batch between the listing and the claim
        logger.info("another run claimed the batch in %s: nothing to audit", inbox)
        return None
    corrected = correct(store, correction_settings, audited.run_id)
    return PipelineResult(audited.run_id, corrected.run_id, corrected.registered_version)
