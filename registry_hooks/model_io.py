"""Logging and loading PyTorch classifiers in MLflow.

Models are logged with `serialization_format="pickle"`: MLflow's default pt2 export fixes the
batch size and cannot be fine-tuned. Loading a pickled model runs code from the artifact store:
only load models from a registry you trust (see docs/security.md). What can be checked is: the
SHA-256 of the files a load reads (`MLmodel` and `data/`) is recorded in the tracking store (run
param `model_digest`) when the model is logged, and a load downloads the files, checks them
against it and only then unpickles that verified copy, so a file swapped in the artifact store
is refused, not run. Unpickling needs an explicit opt-in (`load_version(..., allow_pickle=True)`,
which the CLI sets from `--allow-pickle` or MODEL_AUDIT_ALLOW_PICKLE=1); without it nothing is
downloaded.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from audit.errors import AuditError, IntegrityError, InvalidInput, LineageError

MODEL_ARTIFACT = "model"
DIGEST_PARAM = "model_digest"
# How a user opts in to unpickling (named by the refusal; flows/cli.py reads both).
ALLOW_PICKLE_FLAG = "--allow-pickle"
ALLOW_PICKLE_ENV = "MODEL_AUDIT_ALLOW_PICKLE"


class PickleNotAllowed(AuditError):
    """Loading a pickled model was not opted in to (unpickling runs code from the artifact store)."""


@dataclass(frozen=True)
class ModelSpec:
    """What the audit needs to know about a classifier besides its weights: the input shape of
    one example, the number of classes, and the (min, max) of the training inputs, None for a
    model logged before it was recorded (its flagged inputs are then checked for finiteness only)."""

    input_shape: tuple[int, ...]
    num_classes: int
    input_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        low, high = self.input_range or (0.0, 0.0)
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise InvalidInput(f"input_range must be finite (min, max) with min <= max, got {self.input_range!r}.")

    @classmethod
    def for_training(cls, inputs: torch.Tensor, num_classes: int) -> ModelSpec:
        """The spec of a model trained on `inputs` [N, *input_shape]: its shape and value range."""
        return cls(tuple(inputs.shape[1:]), num_classes, (float(inputs.min()), float(inputs.max())))

    def params(self) -> dict[str, str]:
        """Run params: `input_shape` ("1x8x8"), `num_classes` and, when known, `input_min` / `input_max`
        (repr of the float, so they read back exactly)."""
        params = {"input_shape": "x".join(map(str, self.input_shape)), "num_classes": str(self.num_classes)}
        if self.input_range is not None:
            params |= {"input_min": repr(self.input_range[0]), "input_max": repr(self.input_range[1])}
        return params

    @classmethod
    def from_params(cls, params: dict[str, str]) -> ModelSpec:
        try:
            shape = tuple(int(v) for v in params["input_shape"].split("x"))
            num_classes = int(params["num_classes"])
        except (KeyError, ValueError) as exc:
            raise LineageError(
                "The model's run does not record `input_shape` and `num_classes` params; "
                "log it with model-audit's training helpers."
            ) from exc
        bounds = (params.get("input_min"), params.get("input_max"))
        if bounds == (None, None):  # logged before the range was recorded
            return cls(shape, num_classes)
        try:
            return cls(shape, num_classes, (float(bounds[0]), float(bounds[1])))
        except (TypeError, ValueError, InvalidInput) as exc:
            raise LineageError(f"The model's run records an unusable input range (input_min={bounds[0]!r}, "
                               f"input_max={bounds[1]!r}); both must be finite numbers, min <= max.") from exc


@dataclass(frozen=True)
class LoadedModel:
    """A registered model version loaded for auditing."""

    model: torch.nn.Module
    name: str
    version: str
    run_id: str
    spec: ModelSpec


def log_classifier(model: torch.nn.Module, spec: ModelSpec) -> str:
    """Log `model` (pickled) into the active run with spec params (input shape, classes and, when
    `spec` has it, the training input range: use `ModelSpec.for_training`), a signature and the
    digest of its files; returns its URI."""
    mlflow.log_params(spec.params())
    example = np.zeros((2, *spec.input_shape), dtype=np.float32)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        model,
        name=MODEL_ARTIFACT,
        serialization_format="pickle",
        signature=infer_signature(example, logits),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "model-audit"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_param(DIGEST_PARAM, artifact_digest(_download(info.model_uri, Path(tmp))))
    return info.model_uri


def artifact_digest(folder: Path) -> str:
    """SHA-256 over the relative path and bytes of `MLmodel` and every file under `data/` (what
    loading reads; files MLflow writes on download, e.g. registered_model_meta, are left out)."""
    files = [folder / "MLmodel", *sorted(p for p in (folder / "data").rglob("*") if p.is_file())]
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest() if path.exists() else b"missing")
    return h.hexdigest()


def _download(model_uri: str, folder: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder)))


@dataclass(frozen=True)
class VersionRef:
    """A registered version resolved from an alias or number, with its training run's spec."""

    name: str
    version: str
    run_id: str
    spec: ModelSpec
    model_digest: str | None = None


def resolve_version(name: str, alias: str | None = None, version: str | None = None) -> VersionRef:
    """Resolve `<name>@<alias>` (or a numbered version) without loading weights."""
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as exc:
        ref = f"@{alias}" if alias else f"version {version}"
        raise LineageError(f"No registered model {name} {ref} in this MLflow store.") from exc
    params = client.get_run(mv.run_id).data.params
    return VersionRef(name, str(mv.version), mv.run_id, ModelSpec.from_params(params), params.get(DIGEST_PARAM))


def require_pickle_opt_in(ref: VersionRef, allow_pickle: bool) -> None:
    """PickleNotAllowed unless `allow_pickle`: every version model-audit loads is a pickle."""
    if not allow_pickle:
        raise PickleNotAllowed(
            f"Version {ref.version} of {ref.name} is a pickled model, and unpickling runs code from the MLflow "
            f"artifact store, so loading it needs an explicit opt-in: pass {ALLOW_PICKLE_FLAG} or set "
            f"{ALLOW_PICKLE_ENV}=1 (a deployment: parameter store.allow_pickle) if you trust this registry.")


def load_version(ref: VersionRef, *, allow_pickle: bool) -> LoadedModel:
    """Load a resolved version's weights (pickled PyTorch module) in eval mode on the CPU.

    PickleNotAllowed, before anything is downloaded, unless `allow_pickle` (the caller trusts the
    registry); IntegrityError, before anything is unpickled, when the files differ from the digest
    recorded when the version was logged, or no digest was recorded."""
    require_pickle_opt_in(ref, allow_pickle)
    if ref.model_digest is None:
        raise IntegrityError(f"Version {ref.version} of {ref.name} has no recorded `{DIGEST_PARAM}`, so its files "
                             "cannot be checked before unpickling; log it with registry_hooks.model_io.log_classifier.")
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(f"models:/{ref.name}/{ref.version}", Path(tmp))
        if artifact_digest(local) != ref.model_digest:
            raise IntegrityError(f"The files of version {ref.version} of {ref.name} differ from those logged with it "
                                 "(digest mismatch): refusing to load a model that was changed in the artifact store.")
        try:
            model = mlflow.pytorch.load_model(str(local), map_location="cpu")
        except mlflow.exceptions.MlflowException as exc:  # e.g. MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
            raise IntegrityError(f"MLflow refused to load version {ref.version} of {ref.name}: "
                                 f"{str(exc).splitlines()[0]}") from None
    return LoadedModel(model.eval(), ref.name, ref.version, ref.run_id, ref.spec)
