"""Kind `pytorch`: any `torch.nn.Module`, pickled through `mlflow.pytorch` (MLflow's default pt2
export fixes the batch size and cannot be fine-tuned). The default kind, and the kind of every
version logged before kinds were recorded. Loading it unpickles: see docs/security.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import torch

from registry_hooks.model_kinds.registry import MODEL_ARTIFACT, ModelKind, register, tensor_signature

if TYPE_CHECKING:
    from registry_hooks.model_io import ModelSpec


@dataclass(frozen=True)
class PyTorchModule(ModelKind):
    """A pickled PyTorch module; its class must be importable, at the same version, wherever it is loaded."""

    name = "pytorch"
    needs_pickle = True

    def log(self, model: torch.nn.Module, spec: ModelSpec) -> str:
        info = mlflow.pytorch.log_model(
            model,
            name=MODEL_ARTIFACT,
            serialization_format="pickle",
            signature=tensor_signature(model, spec),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "model-audit"],
        )
        return info.model_uri

    def load(self, folder: Path, spec: ModelSpec) -> tuple[torch.nn.Module, ModelKind]:
        # MlflowException (e.g. MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false) is turned into one sentence by load_version.
        return mlflow.pytorch.load_model(str(folder), map_location="cpu"), self


register(PyTorchModule)
