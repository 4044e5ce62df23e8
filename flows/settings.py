"""Typed settings of the flows, validated once at the boundary (CLI, deployment parameters)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from audit.correction.search import CANDIDATES_BY_NAME, DEFAULT_CANDIDATES, RepairCandidate
from audit.gates import GateThresholds
from audit.influence import METHODS, NEEDS_CHECKPOINTS, NO_SELF_INFLUENCE

# The audit flow scores the flagged batch and self-influence, without training checkpoints.
AUDIT_METHODS = tuple(m for m in METHODS if m not in NEEDS_CHECKPOINTS + NO_SELF_INFLUENCE)


class AuditSettings(BaseModel):
    """Which model to audit, against which flagged batch, where MLflow lives and how to score."""

    model_config = ConfigDict(frozen=True)

    workdir: Path = Field(Path("audit-workdir"), description="holds mlflow.db, mlruns, inbox, quarantine")
    model_name: str = Field("digits-classifier", min_length=1)
    alias: str = Field("champion", min_length=1, description="registry alias of the version to audit")
    inbox: Path | None = Field(None, description="flagged batch file or folder; default <workdir>/inbox")
    tracking_uri: str | None = Field(None, description="MLflow server URL; default sqlite in workdir")
    method: str = Field("ekfac", description="influence method of audit.influence")
    top_k: int = Field(10, ge=1, le=1000, description="helpful and harmful examples kept per query")
    claim_timeout_s: float = Field(
        3600.0, gt=0.0, description="a claimed batch untouched this long belonged to a run that died; it is recovered")

    @field_validator("method")
    @classmethod
    def _runnable_method(cls, method: str) -> str:
        if method in NEEDS_CHECKPOINTS:
            raise ValueError(f"influence method {method!r} needs training checkpoints, which the audit flow does "
                             f"not load; choose one of {', '.join(AUDIT_METHODS)}")
        if method in NO_SELF_INFLUENCE:
            raise ValueError(f"influence method {method!r} has no self-influence, which every audit reports; "
                             f"choose one of {', '.join(AUDIT_METHODS)}")
        if method not in METHODS:
            raise ValueError(f"unknown influence method {method!r}; choose one of {', '.join(AUDIT_METHODS)}")
        return method

    @property
    def inbox_path(self) -> Path:
        return self.inbox if self.inbox is not None else self.workdir / "inbox"


class CorrectionSettings(BaseModel):
    """How the correction flow searches for a repair and gates it; strategy knobs live in
    audit.correction (the named candidates of audit.correction.search)."""

    model_config = ConfigDict(frozen=True)

    workdir: Path = Path("audit-workdir")
    tracking_uri: str | None = None
    min_fix_rate: float = Field(0.5, ge=0.0, le=1.0, description="flagged fix-rate gate")
    max_accuracy_drop_points: float = Field(0.5, ge=0.0, le=100.0)
    harm_resolution_examples: int = Field(
        GateThresholds().harm_resolution_examples, ge=0,
        description="a drop beyond a harm gate's threshold fails only past this many examples lost net")
    harm_significance: float | None = Field(
        GateThresholds().harm_significance, gt=0.0, lt=1.0,
        description="and, if set, only when McNemar p on the changed examples is below it")
    min_horizon_correlation: float = Field(
        0.5, ge=0.0, le=1.0,
        description="steps per repair round are capped at the longest influence horizon with at least this Pearson")
    candidates: tuple[str, ...] = Field(
        tuple(c.name for c in DEFAULT_CANDIDATES), min_length=1,
        description="repair candidates tried in order (names of audit.correction.search.CANDIDATES_BY_NAME)")
    selection_fraction: float = Field(
        1 / 3, gt=0.0, lt=1.0, description="share of the validation split that selects among candidates")

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [n for n in names if n not in CANDIDATES_BY_NAME]
        if unknown:
            raise ValueError(f"unknown repair candidates {unknown}; choose from {', '.join(CANDIDATES_BY_NAME)}")
        if len(set(names)) != len(names):
            raise ValueError("each repair candidate may be named once")
        return names

    def thresholds(self) -> GateThresholds:
        """The gate thresholds these settings set (the others at their defaults)."""
        return GateThresholds(min_fix_rate=self.min_fix_rate, max_accuracy_drop_points=self.max_accuracy_drop_points,
                              harm_resolution_examples=self.harm_resolution_examples,
                              harm_significance=self.harm_significance)

    def repair_candidates(self) -> tuple[RepairCandidate, ...]:
        """The named candidates, in the order given."""
        return tuple(CANDIDATES_BY_NAME[n] for n in self.candidates)
