"""Typed settings of the flows, validated once at the boundary (CLI, deployment parameters)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from audit.influence import METHODS


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

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"unknown influence method {method!r}; choose one of {', '.join(METHODS)}")
        return method

    @property
    def inbox_path(self) -> Path:
        return self.inbox if self.inbox is not None else self.workdir / "inbox"


class CorrectionSettings(BaseModel):
    """How the correction flow repairs and gates; strategy knobs live in audit.correction."""

    model_config = ConfigDict(frozen=True)

    workdir: Path = Path("audit-workdir")
    tracking_uri: str | None = None
    min_fix_rate: float = Field(0.5, ge=0.0, le=1.0, description="flagged fix-rate gate")
    max_accuracy_drop_points: float = Field(0.5, ge=0.0, le=100.0)
    min_horizon_correlation: float = Field(
        0.5, ge=0.0, le=1.0,
        description="steps per repair round are capped at the longest influence horizon with at least this Pearson")
