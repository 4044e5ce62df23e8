"""Logging and loading PyTorch classifiers in MLflow.

Models are logged with `serialization_format="pickle"`: MLflow's default pt2 export fixes the
batch size and cannot be fine-tuned. Loading a pickled model runs code from the artifact store:
only load models from a registry you trust (see docs/security.md). What can be checked is: the
SHA-256 of the files a load reads (`MLmodel` and `data/`) is recorded in the tracking store (run
param `model_digest`) when the model is logged, and a load downloads the files, checks them
against it and only then unpickles that verified copy, so a file swapped in the artifact store
is refused, not run.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from audit.errors import IntegrityError, LineageError

MODEL_ARTIFACT = "model"
DIGEST_PARAM = "model_digest"


@dataclass(frozen=True)
class ModelSpec:
    """What the audit needs to know about a classifier besides its weights."""

    input_shape: tuple[int, ...]
    num_classes: int

    def params(self) -> dict[str, str]:
        return {"input_shape": "x".join(map(str, self.input_shape)), "num_classes": str(self.num_classes)}

    @classmethod
    def from_params(cls, params: dict[str, str]) -> ModelSpec:
        try:
            shape = tuple(int(v) for v in params["input_shape"].split("x"))
            return cls(shape, int(params["num_classes"]))
        except (KeyError, ValueError) as exc:
            raise LineageError(
                "The model's run does not record `input_shape` and `num_classes` params; "
                "log it with model-audit's training helpers."
            ) from exc


@dataclass(frozen=True)
class LoadedModel:
    """A registered model version loaded for auditing."""

    model: torch.nn.Module
    name: str
    version: str
    run_id: str
    spec: ModelSpec


def log_classifier(model: torch.nn.Module, spec: ModelSpec) -> str:
    """Log `model` (pickled) into the active run with spec params and a signature; returns its URI."""
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


def load_version(ref: VersionRef) -> LoadedModel:
    """Load a resolved version's weights (pickled PyTorch module) in eval mode on the CPU, after
    checking its files against the digest recorded when it was logged; IntegrityError, before
    anything is unpickled, when they differ or no digest was recorded."""
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
