"""Logging and loading PyTorch classifiers in MLflow.

Models are logged with `serialization_format="pickle"`: MLflow's default pt2 export fixes the
batch size and cannot be fine-tuned. Loading a pickled model runs code from the artifact store:
only load models from a registry you trust (see docs/security.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from audit.errors import LineageError

MODEL_ARTIFACT = "model"


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
    return info.model_uri


@dataclass(frozen=True)
class VersionRef:
    """A registered version resolved from an alias or number, with its training run's spec."""

    name: str
    version: str
    run_id: str
    spec: ModelSpec


def resolve_version(name: str, alias: str | None = None, version: str | None = None) -> VersionRef:
    """Resolve `<name>@<alias>` (or a numbered version) without loading weights."""
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as exc:
        ref = f"@{alias}" if alias else f"version {version}"
        raise LineageError(f"No registered model {name} {ref} in this MLflow store.") from exc
    spec = ModelSpec.from_params(client.get_run(mv.run_id).data.params)
    return VersionRef(name, str(mv.version), mv.run_id, spec)


def load_version(ref: VersionRef) -> LoadedModel:
    """Load a resolved version's weights (pickled PyTorch module) in eval mode on the CPU."""
    model = mlflow.pytorch.load_model(f"models:/{ref.name}/{ref.version}", map_location="cpu")
    return LoadedModel(model.eval(), ref.name, ref.version, ref.run_id, ref.spec)
