"""The `audit.*` tags model-audit writes on MLflow runs and model versions (DESIGN.md "MLflow
layout"), in one place: every reader and writer goes through these types, never a string key.

    RunTags(model_name, model_version, "audit", flagged_digest).to_mlflow()
    RunTags.from_mlflow(run.data.tags)          # AuditError if the run is not one of ours
    VersionTags(source_version, audit_run_id).to_mlflow()
"""

from __future__ import annotations

from dataclasses import dataclass

from audit.errors import AuditError

KIND = "audit.kind"
MODEL_NAME = "audit.model_name"
MODEL_VERSION = "audit.model_version"
FLAGGED_DIGEST = "audit.flagged_digest"
AUDIT_RUN_ID = "audit.audit_run_id"
SOURCE_VERSION = "audit.source_version"
GATES = "audit.gates"
PROMOTION_OVERRIDE = "audit.promotion_override"
# Registered-model tag: the champion model-audit set last (a gated promotion, or the baseline its
# training registered) or the guard accepted as gated; the version the registry guard restores.
CHAMPION_OF_RECORD = "audit.champion_of_record"
# On a version champion was moved to without passing the gates, and on the registered model (the
# guard's latest action): what a reviewer sees in the MLflow UI.
GUARD = "audit.guard"
# On a model's training run, per split (train, validation, relabels): where this run's data is, as
# JSON (registry_hooks.lineage; MLflow shares one dataset record between runs with the same digest).
DATA_SOURCE = "audit.data.{split}"

KINDS = ("audit", "correction")
GATES_PASSED, GATES_FAILED = "passed", "failed"


@dataclass(frozen=True)
class RunTags:
    """Tags of an audit or correction run. `audit_run_id` (the audit a correction repaired) and
    `gates` (passed | failed) are set on correction runs only."""

    model_name: str
    model_version: str
    kind: str
    flagged_digest: str
    audit_run_id: str | None = None
    gates: str | None = None

    def to_mlflow(self) -> dict[str, str]:
        """The tags as MLflow stores them (absent optional fields are left out)."""
        tags = {MODEL_NAME: self.model_name, MODEL_VERSION: self.model_version, KIND: self.kind,
                FLAGGED_DIGEST: self.flagged_digest}
        if self.audit_run_id is not None:
            tags[AUDIT_RUN_ID] = self.audit_run_id
        if self.gates is not None:
            tags[GATES] = self.gates
        return tags

    @classmethod
    def from_mlflow(cls, tags: dict[str, str], run_id: str = "") -> RunTags:
        """Read a run's tags back; AuditError when the run carries no model-audit kind or lacks a tag."""
        if tags.get(KIND) not in KINDS:
            raise AuditError(f"Run {run_id} is not a model-audit run (tag {KIND}={tags.get(KIND)!r}).")
        missing = [key for key in (MODEL_NAME, MODEL_VERSION, FLAGGED_DIGEST) if key not in tags]
        if missing:
            raise AuditError(f"Run {run_id} lacks the tags {', '.join(missing)}; it was not logged by model-audit.")
        return cls(tags[MODEL_NAME], tags[MODEL_VERSION], tags[KIND], tags[FLAGGED_DIGEST], tags.get(AUDIT_RUN_ID),
                   tags.get(GATES))


@dataclass(frozen=True)
class VersionTags:
    """Tags of a registered repair: the version it repaired, the audit behind it, its gates."""

    source_version: str
    audit_run_id: str
    gates: str = GATES_PASSED

    def to_mlflow(self) -> dict[str, str]:
        return {SOURCE_VERSION: self.source_version, AUDIT_RUN_ID: self.audit_run_id, GATES: self.gates}


def gates_passed(version_tags: dict[str, str]) -> bool:
    """Whether a model version carries `audit.gates=passed` (the only versions promote accepts)."""
    return version_tags.get(GATES) == GATES_PASSED
