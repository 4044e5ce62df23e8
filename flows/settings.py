"""Typed settings of the flows, validated once at the boundary (CLI, deployment parameters).

Every flow takes the store it works on (`StoreSettings`) once, next to its own settings, so an
audit and the correction that follows it cannot point at different stores. Every model refuses
fields it does not know: a misspelt option, or a `workdir` left inside the audit settings of a
deployment made before the store had its own settings, fails validation instead of being
silently replaced by a default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from audit.correction.config import STRATEGIES
from audit.correction.search import CANDIDATES_BY_NAME, DEFAULT_CANDIDATES, RepairCandidate
from audit.gates import GateThresholds
from audit.influence import METHODS, NEEDS_CHECKPOINTS, NO_SELF_INFLUENCE
from audit.scoring import AUTO, INDEX, RERANKED

# The audit flow scores the flagged batch and self-influence, without training checkpoints; the
# gradient index (audit.scoring.INDEX) does both from rows built once per model version (RERANKED:
# its shortlists re-scored exactly); AUTO picks EK-FAC or the index from the model's size
# (audit.scoring.choose_method).
AUDIT_METHODS = (*(m for m in METHODS if m not in NEEDS_CHECKPOINTS + NO_SELF_INFLUENCE), INDEX, RERANKED, AUTO)
# The correction re-scores the still-wrong flagged examples (influence scores only, no
# self-influence, so gradcos can), and has no training checkpoints either.
CORRECTION_METHODS = tuple(m for m in METHODS if m not in NEEDS_CHECKPOINTS)

_SETTINGS = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
_GATES = GateThresholds()


def _runnable(method: str, allowed: tuple[str, ...], flow: str, needs_self_influence: bool) -> str:
    """`method` if the flow can run it, else ValueError saying why and what to choose."""
    choose = f"choose one of {', '.join(allowed)}"
    if method in NEEDS_CHECKPOINTS:
        raise ValueError(f"influence method {method!r} needs training checkpoints, which the {flow} flow does not "
                         f"load; {choose}")
    if needs_self_influence and method in NO_SELF_INFLUENCE:
        raise ValueError(f"influence method {method!r} has no self-influence, which every audit reports; {choose}")
    if method not in allowed:
        raise ValueError(f"unknown influence method {method!r}; {choose}")
    return method


class StoreSettings(BaseModel):
    """The store both flows work on: the workdir (inbox, claims, quarantine, processed batches,
    influence cache, and the embedded MLflow store), the MLflow URI when MLflow lives elsewhere,
    and whether models from it may be unpickled."""

    model_config = _SETTINGS

    workdir: Path = Field(Path("audit-workdir"),
                          description="holds mlflow.db, mlruns, inbox, claims, quarantine, processed, cache")
    tracking_uri: str | None = Field(
        None, min_length=1,
        description="MLflow tracking and registry URI (e.g. an `mlflow server` URL); default sqlite in workdir")
    allow_pickle: bool = Field(
        False,
        description="load this store's pickled models; unpickling runs code from its artifact store, so only for "
                    "a registry you trust (docs/security.md)")


class AuditSettings(BaseModel):
    """Which model to audit, against which flagged batch, and how to score."""

    model_config = _SETTINGS

    model_name: str = Field("digits-classifier", min_length=1)
    alias: str = Field("champion", min_length=1, description="registry alias of the version to audit")
    inbox: Path | None = Field(None, description="flagged batch file or folder; default <workdir>/inbox")
    image_root: Path | None = Field(
        None, description="folder that the `image_path` cells of a flagged batch of image files are relative to")
    method: str = Field("auto", description=f"influence method of audit.influence, or the gradient index: "
                                             f"{', '.join(AUDIT_METHODS)}")
    top_k: int = Field(10, ge=1, le=1000, description="helpful and harmful examples kept per query")
    claim_timeout_s: float = Field(
        3600.0, gt=0.0, description="a claimed batch untouched this long belonged to a run that died; it is recovered")
    max_flagged: int = Field(
        10_000, ge=1,
        description="a flagged batch with more rows is refused and quarantined (scoring cost grows with its size)")
    progress: bool = Field(False, description="draw progress bars of the influence passes on stderr")
    workers: int | None = Field(
        None, ge=1, le=256,
        description="build and query the gradient index on a local Dask cluster of this many worker processes")
    dask_address: str | None = Field(
        None, pattern=r"^(tcp|tls)://\S+:\d+$",
        description="build and query the gradient index on the Dask scheduler at this address (tcp://HOST:PORT)")

    @field_validator("method")
    @classmethod
    def _runnable_method(cls, method: str) -> str:
        return _runnable(method, AUDIT_METHODS, "audit", needs_self_influence=True)

    @model_validator(mode="after")
    def _one_cluster(self) -> AuditSettings:
        if self.workers is not None and self.dask_address is not None:
            raise ValueError("give either workers (a local Dask cluster) or dask_address (an existing one), not both")
        return self

    def scale_out(self) -> str:
        """Where the index's shard jobs run, as the audit run's params record it."""
        if self.dask_address is not None:
            return f"dask {self.dask_address}"
        return f"dask LocalCluster({self.workers})" if self.workers is not None else "this process"

    def inbox_in(self, workdir: Path) -> Path:
        """The flagged batch file or folder: `inbox`, or `<workdir>/inbox` when it is not set."""
        return self.inbox if self.inbox is not None else Path(workdir) / "inbox"


class GateSettings(BaseModel):
    """Every threshold of audit.gates.GateThresholds (whose docstring defines them), with the same
    bounds and defaults; `thresholds()` is the GateThresholds the gates use."""

    model_config = _SETTINGS

    min_fix_rate: float = Field(_GATES.min_fix_rate, ge=0.0, le=1.0,
                                description="fraction of flagged examples the repair must predict right")
    max_accuracy_drop_points: float = Field(_GATES.max_accuracy_drop_points, ge=0.0, le=100.0,
                                            description="largest held-out accuracy drop, in points")
    max_class_recall_drop_points: float = Field(_GATES.max_class_recall_drop_points, ge=0.0, le=100.0,
                                                description="largest recall drop of any class, in points")
    max_canary_flip_rate: float = Field(_GATES.max_canary_flip_rate, ge=0.0, le=1.0,
                                        description="largest fraction of correct canary inputs whose prediction flips")
    onnx_rtol: float = Field(_GATES.onnx_rtol, ge=0.0, description="relative tolerance of ONNX vs PyTorch logits")
    onnx_atol: float = Field(_GATES.onnx_atol, ge=0.0, description="absolute tolerance of ONNX vs PyTorch logits")
    harm_resolution_examples: int = Field(
        _GATES.harm_resolution_examples, ge=0,
        description="a drop beyond a harm gate's threshold fails only past this many examples lost net")
    harm_significance: float | None = Field(
        _GATES.harm_significance, gt=0.0, lt=1.0,
        description="and, if set, only when McNemar p on the changed examples is below it")

    def thresholds(self) -> GateThresholds:
        return GateThresholds(**self.model_dump())


class CorrectionSettings(BaseModel):
    """How the correction flow searches for a repair and gates it: the named candidates of
    audit.correction.search, tried in order, with `strategy` / `method` replacing each one's own
    when set, and every gate threshold."""

    model_config = _SETTINGS

    gates: GateSettings = GateSettings()
    min_horizon_correlation: float = Field(
        0.5, ge=0.0, le=1.0,
        description="steps per repair round are capped at the longest influence horizon with at least this Pearson")
    candidates: tuple[str, ...] = Field(
        tuple(c.name for c in DEFAULT_CANDIDATES), min_length=1,
        description=f"repair candidates tried in order, from: {', '.join(CANDIDATES_BY_NAME)}")
    selection_fraction: float = Field(
        1 / 3, gt=0.0, lt=1.0, description="share of the validation split that selects among candidates")
    strategy: str | None = Field(
        None, description=f"strategy of every candidate ({', '.join(STRATEGIES)}); None keeps each one's own")
    method: str | None = Field(
        None, description=f"influence method every candidate re-scores with ({', '.join(CORRECTION_METHODS)}); "
                          "None keeps each one's own")
    progress: bool = Field(False, description="draw a progress bar over the repair candidates on stderr")

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [n for n in names if n not in CANDIDATES_BY_NAME]
        if unknown:
            raise ValueError(f"unknown repair candidates {unknown}; choose from {', '.join(CANDIDATES_BY_NAME)}")
        if len(set(names)) != len(names):
            raise ValueError("each repair candidate may be named once")
        return names

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, strategy: str | None) -> str | None:
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"unknown repair strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        return strategy

    @field_validator("method")
    @classmethod
    def _runnable_method(cls, method: str | None) -> str | None:
        return None if method is None else _runnable(method, CORRECTION_METHODS, "correction",
                                                     needs_self_influence=False)

    def thresholds(self) -> GateThresholds:
        """The gate thresholds (`gates`)."""
        return self.gates.thresholds()

    def repair_candidates(self, candidates: tuple[RepairCandidate, ...] | None = None) -> tuple[RepairCandidate, ...]:
        """The candidates to try, in order: `candidates` (Python callers) or the named ones, each
        with `strategy` and `method` replacing its own where set."""
        chosen = candidates or tuple(CANDIDATES_BY_NAME[n] for n in self.candidates)
        overrides = {k: v for k, v in (("strategy", self.strategy), ("method", self.method)) if v is not None}
        return tuple(dataclasses.replace(c, config=dataclasses.replace(c.config, **overrides)) for c in chosen)
