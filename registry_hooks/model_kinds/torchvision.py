"""Kind `torchvision`: a torchvision classification architecture, stored as its builder name
(e.g. "resnet18"), the builder's keyword arguments (e.g. {"num_classes": 10}) and a safetensors
state dict, and rebuilt with `torchvision.models.get_model(builder, **kwargs)` plus a strict
`load_state_dict`. Loading runs no code from the artifact store, so it needs no pickle opt-in.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from audit.errors import AuditError, IntegrityError, InvalidInput, LineageError
from registry_hooks.model_kinds.registry import ModelKind, register
from registry_hooks.model_kinds.state_dict import load_state_dict_into, log_state_dict_model

if TYPE_CHECKING:
    from registry_hooks.model_io import ModelSpec

BUILDER_PARAM = "torchvision_builder"
KWARGS_PARAM = "torchvision_kwargs"
FLAVOR = "model_audit_torchvision"
# Builder arguments that fetch pretrained weights at build time: the logged state dict replaces them.
_DOWNLOADING = ("weights", "progress")


def _torchvision():
    import torchvision  # ~5 s to import here: only when a torchvision model is logged or loaded

    return torchvision


@dataclass(frozen=True)
class TorchvisionModel(ModelKind):
    """`torchvision.models.get_model(builder, **kwargs)` with the logged weights, e.g.
    `TorchvisionModel("resnet18", {"num_classes": 10})`. `kwargs` must be JSON values (recorded as
    the run param `torchvision_kwargs`; read-only here, lists come back as lists) and must not ask
    for pretrained `weights`: the model's own state dict is what is logged."""

    builder: str
    kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)

    name = "torchvision"
    needs_pickle = False

    def __post_init__(self) -> None:
        models = _torchvision().models
        if not isinstance(self.builder, str) or self.builder not in models.list_models(module=models):
            raise InvalidInput(f"torchvision {_torchvision().__version__} has no classification model "
                               f"{self.builder!r} (torchvision.models.list_models(module=torchvision.models) "
                               "names them).")
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(k, str) for k in self.kwargs):
            raise InvalidInput(f"The keyword arguments of torchvision {self.builder} must be a mapping with string "
                               f"keys; got {self.kwargs!r}.")
        asked = [k for k in _DOWNLOADING if k in self.kwargs]
        if asked:
            raise InvalidInput(f"Do not pass {', '.join(asked)} to torchvision {self.builder}: the model's own "
                               "weights are logged, and loading must not download any.")
        try:
            canonical = json.dumps(dict(self.kwargs), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"The keyword arguments of torchvision {self.builder} must be JSON values, to be "
                               f"recorded as a run param; got {self.kwargs!r}.") from exc
        # Normalised to what reading the param back gives, so a logged and a resolved kind compare equal.
        object.__setattr__(self, "kwargs", MappingProxyType(json.loads(canonical)))

    def expression(self) -> str:
        """The builder call, for messages: `resnet18(num_classes=10)`."""
        return f"{self.builder}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"

    def params(self) -> dict[str, str]:
        return {BUILDER_PARAM: self.builder, KWARGS_PARAM: json.dumps(dict(self.kwargs), sort_keys=True)}

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> TorchvisionModel:
        if BUILDER_PARAM not in params or KWARGS_PARAM not in params:
            raise LineageError(f"The model's run records the torchvision kind without the `{BUILDER_PARAM}` and "
                               f"`{KWARGS_PARAM}` params it is rebuilt from; log it with log_classifier.")
        try:
            return cls(params[BUILDER_PARAM], json.loads(params[KWARGS_PARAM]))
        except (ValueError, InvalidInput) as exc:  # not JSON; a builder this torchvision lacks
            raise LineageError(f"The model's run records a torchvision model this installation cannot rebuild "
                               f"({BUILDER_PARAM}={params[BUILDER_PARAM]!r}, {KWARGS_PARAM}={params[KWARGS_PARAM]!r}): "
                               f"{str(exc).rstrip('.')}.") from None

    def build(self, error: type[AuditError] = InvalidInput) -> torch.nn.Module:
        """A freshly initialised model from the builder (never downloads); `error` when it refuses the arguments."""
        try:
            return _torchvision().models.get_model(self.builder, **self.kwargs)
        except (TypeError, ValueError) as exc:
            raise error(f"torchvision {_torchvision().__version__} cannot build {self.expression()}: "
                        f"{' '.join(str(exc).split())}") from None

    def check(self, model: torch.nn.Module, spec: ModelSpec) -> None:
        reference = self.build()
        if type(model) is not type(reference):
            raise InvalidInput(f"The model is a {type(model).__name__}, not the {type(reference).__name__} that "
                               f"torchvision's {self.expression()} builds, so it cannot be logged as that one.")
        ours, theirs = model.state_dict(), reference.state_dict()
        differs = sorted(set(ours) ^ set(theirs)) or [
            k for k in ours if (ours[k].shape, ours[k].dtype) != (theirs[k].shape, theirs[k].dtype)]
        if differs:
            raise InvalidInput(f"The model's weights do not fit torchvision's {self.expression()} (first difference: "
                               f"{differs[0]!r}); log it with the builder arguments it was made with.")

    def log(self, model: torch.nn.Module, spec: ModelSpec) -> str:
        tv = _torchvision()
        conf = {"builder": self.builder, "kwargs": dict(self.kwargs), "torchvision_version": tv.__version__}
        requirements = [f"{package}=={version.split('+')[0]}" for package, version in
                        (("torch", torch.__version__), ("torchvision", tv.__version__),
                         ("safetensors", importlib.metadata.version("safetensors")))]
        return log_state_dict_model(model, spec, FLAVOR, conf, requirements)

    def load(self, folder: Path, spec: ModelSpec) -> tuple[torch.nn.Module, ModelKind]:
        return load_state_dict_into(self.build(IntegrityError), folder), self


register(TorchvisionModel)
