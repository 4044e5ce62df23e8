"""Model kinds, by name: how one kind of classifier is stored in MLflow and rebuilt from its files.

Each kind is one module in `registry_hooks/model_kinds/` that subclasses `ModelKind` (a frozen
dataclass) and calls `register` with it. A kind's instance is what a version needs besides its
files (nothing for a pickled module; builder name and keyword arguments for a torchvision
architecture). It travels in `ModelSpec.kind`, is recorded as run params (`model_kind` plus the
kind's own, read back by `from_params`), and decides how `log_classifier` writes the model and
how `load_version` reads it back. A run without `model_kind` was logged before kinds existed: it
is the `pytorch` kind.
"""

from __future__ import annotations

import abc
import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from mlflow.models import ModelSignature, infer_signature

from audit.errors import InvalidInput, LineageError
from audit.modalities import Modality, Pixels

if TYPE_CHECKING:  # model_io imports this package for ModelSpec's default kind
    from registry_hooks.model_io import ModelSpec

KIND_PARAM = "model_kind"
DEFAULT_KIND = "pytorch"  # what a run without KIND_PARAM holds
MODEL_ARTIFACT = "model"  # the name every kind logs its MLflow model under
# The name becomes a run param value and part of other kinds' param names.
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class ModelKind(abc.ABC):
    """One way of storing a classifier in MLflow. Subclasses are frozen dataclasses whose fields
    are what the kind records besides the files (hashable and compared: they are part of ModelSpec).

    Class attributes:
    - `name`: recorded as run param `model_kind`;
    - `needs_pickle`: loading unpickles, so `load_version` demands the caller's opt-in;
    - `files`: what `load` reads, relative to the model's folder (a trailing "/" names a folder,
      every file under it); the digest `log_classifier` records covers exactly these.

    Methods: `params` / `from_params` (the kind's own run params, read back to an equal instance),
    `check` (refuse a model before anything is logged), `log` (write the files into the active run
    as MLflow model `model`, return its URI) and `load` (rebuild from the verified folder)."""

    name: ClassVar[str]
    needs_pickle: ClassVar[bool]
    files: ClassVar[tuple[str, ...]] = ("MLmodel", "data/")

    def params(self) -> dict[str, str]:
        """The kind's own run params, besides `model_kind` (names prefixed with the kind's name)."""
        return {}

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> ModelKind:
        """The instance whose `params()` a run recorded; LineageError when they are missing or unusable."""
        return cls()

    def default_modality(self, input_shape: tuple[int, ...]) -> Modality:
        """The modality of a ModelSpec of this kind that names none: flat `pixels` of `input_shape`."""
        return Pixels(input_shape)

    def check(self, model: torch.nn.Module, spec: ModelSpec) -> None:  # noqa: B027 - optional hook
        """InvalidInput when `model` cannot be stored as this kind; called before anything is logged."""

    @abc.abstractmethod
    def log(self, model: torch.nn.Module, spec: ModelSpec) -> str:
        """Log `model` into the active run as MLflow model `MODEL_ARTIFACT`, its `files` holding all
        that `load` needs; returns the model URI."""

    @abc.abstractmethod
    def load(self, folder: Path, spec: ModelSpec) -> tuple[torch.nn.Module, ModelKind]:
        """Rebuild the module on the CPU from `folder` (downloaded, its `files` digest-checked), reading
        nothing else from the artifact store. Returns it with the kind as loaded: `self`, or a copy that
        also holds what logging the repaired model needs besides the module (e.g. a tokenizer), since
        `LoadedModel.spec` carries it to `log_classifier`. IntegrityError when the files do not
        rebuild the model."""


@dataclass(frozen=True)
class Registration:
    """Handle returned by `register`: `remove()` (or leaving a `with` block) unregisters the kind."""

    kind: type[ModelKind]

    def remove(self) -> None:
        """Unregister the kind; a no-op if it is no longer the one registered under its name."""
        if _REGISTRY.get(self.kind.name) is self.kind:
            del _REGISTRY[self.kind.name]

    def __enter__(self) -> type[ModelKind]:
        return self.kind

    def __exit__(self, *exc: object) -> None:
        self.remove()


_REGISTRY: dict[str, type[ModelKind]] = {}


def register(kind: type[ModelKind]) -> Registration:
    """Make `kind` loadable wherever a run records `model_kind=<its name>`. Refuses a name that is
    already registered, so no kind is silently replaced."""
    if not (isinstance(kind, type) and issubclass(kind, ModelKind)):
        raise InvalidInput(f"register() takes a ModelKind subclass; got {kind!r}.")
    name = getattr(kind, "name", None)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"A model kind's name must be lower-case letters, digits and '_', starting with a letter; "
                           f"{kind.__name__} has {name!r}.")
    if not isinstance(getattr(kind, "needs_pickle", None), bool):
        raise InvalidInput(f"Model kind {name!r} must say whether loading it unpickles (needs_pickle: bool).")
    if name in _REGISTRY:
        raise InvalidInput(f"Model kind {name!r} is already registered; remove it before re-registering.")
    _REGISTRY[name] = kind
    return Registration(kind)


def _builtins() -> None:
    # Importing the package registers the built-in kinds; lazily, so that their modules can import this one.
    importlib.import_module("registry_hooks.model_kinds")


def names() -> tuple[str, ...]:
    """Names of every registered kind, the built-ins first."""
    _builtins()
    return tuple(_REGISTRY)


def find(name: str) -> type[ModelKind] | None:
    """The kind registered as `name`, or None."""
    _builtins()
    return _REGISTRY.get(name) if isinstance(name, str) else None


def kind_from_params(params: Mapping[str, str]) -> ModelKind:
    """The kind a model's run records (`model_kind`, `pytorch` when absent, and the kind's own params);
    LineageError when no registered kind has that name."""
    name = params.get(KIND_PARAM, DEFAULT_KIND)
    kind = find(name)
    if kind is None:
        raise LineageError(f"The model's run records `{KIND_PARAM}` {name!r}, which this installation cannot load "
                           f"(known kinds: {', '.join(names())}); install the module that registers it.")
    return kind.from_params(params)


def tensor_signature(model: torch.nn.Module, spec: ModelSpec, dtype: type[np.generic] = np.float32) -> ModelSignature:
    """MLflow signature of a model taking tensors [B, *spec.input_shape] of `dtype` (float32 for
    pixels; int64 for token ids) to logits, from a forward pass (in eval mode, which it leaves set)
    on two zero inputs."""
    example = np.zeros((2, *spec.input_shape), dtype=dtype)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(example)).numpy()
    return infer_signature(example, logits)
