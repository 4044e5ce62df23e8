"""Files of the kinds stored as a safetensors state dict (no pickle): `data/model.safetensors`
beside an `MLmodel` that names the kind's flavour, its configuration and the tensor signature.
A kind that rebuilds a known architecture needs only these two functions and its builder.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from mlflow.models import Model

from audit.errors import IntegrityError
from registry_hooks.model_kinds.registry import MODEL_ARTIFACT, tensor_signature

if TYPE_CHECKING:
    from registry_hooks.model_io import ModelSpec

WEIGHTS = "data/model.safetensors"


def log_state_dict_model(model: torch.nn.Module, spec: ModelSpec, flavor: str, conf: dict[str, Any],
                         requirements: list[str]) -> str:
    """Log `model`'s state dict as safetensors (`WEIGHTS`) in MLflow model `model` of the active run,
    its MLmodel carrying flavour `flavor` with `conf` (YAML-serialisable) and the tensor signature,
    and `requirements` as requirements.txt; returns the model URI. Tied tensors are stored once."""
    from safetensors.torch import save_model

    signature = tensor_signature(model, spec)

    def save(path: str, mlflow_model: Model, **_: Any) -> None:
        folder = Path(path)
        (folder / WEIGHTS).parent.mkdir(parents=True)
        save_model(model, str(folder / WEIGHTS))
        mlflow_model.signature = signature
        mlflow_model.add_flavor(flavor, weights=WEIGHTS, **conf)
        mlflow_model.save(str(folder / "MLmodel"))
        (folder / "requirements.txt").write_text("".join(f"{r}\n" for r in requirements))

    # Model.log calls flavor.save_model and logs the folder as a logged model, as MLflow's own flavours do.
    info = Model.log(None, SimpleNamespace(__name__=flavor, save_model=save), name=MODEL_ARTIFACT)
    return info.model_uri


def load_state_dict_into(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """`model` with the weights in `folder/WEIGHTS` loaded strictly (every key present, no extra,
    same shapes); IntegrityError naming the mismatch otherwise. Reads tensors only: no pickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(model, Path(folder) / WEIGHTS, strict=True)
    except (RuntimeError, OSError, SafetensorError) as exc:  # keys or shapes differ; file missing or malformed
        detail = " ".join(str(exc).split())
        raise IntegrityError(f"The logged weights do not fit a {type(model).__name__} ({detail}).") from None
    return model
