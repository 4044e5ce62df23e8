"""Modalities, by name: what one example's model input is in a data frame (a flagged batch, a
training split) and how it is encoded into the tensor the model takes.

Each modality is one module in `audit/modalities/` that subclasses `Modality` (a frozen dataclass)
and calls `register` with it. Its instance travels in `ModelSpec.modality` and is recorded as run
params (`modality` plus the modality's own, read back by `from_params`); a run without `modality`
was logged before modalities existed: it is `pixels`.
"""

from __future__ import annotations

import abc
import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch

from audit.errors import InvalidInput, LineageError
from audit.examples import ExampleTable

MODALITY_PARAM = "modality"
DEFAULT_MODALITY = "pixels"  # what a run without MODALITY_PARAM holds
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class InputCheck:
    """One check of the flagged batch's input columns, evaluated per row by the modality: `passed`
    [N] (True: the row is fine), `description` the check's readable name. `counted` ("outside"):
    a failure also says how many rows failed, as "<description>: 2 rows outside"."""

    name: str
    passed: list[bool]
    description: str
    counted: str | None = None


@dataclass(frozen=True)
class Modality(abc.ABC):
    """One kind of model input. Subclasses are frozen dataclasses whose fields are what the
    modality records besides the model (hashable and compared: they are part of ModelSpec).

    Class attributes: `name` (recorded as run param `modality`) and `columns`, the frame columns
    holding the model input. Methods: `params` / `from_params` (its own run params, read back to an
    equal instance), `input_shape` (one encoded example), `table` (encode a frame) and
    `input_checks` (what the flagged batch's validation suite checks in the input columns)."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]

    def params(self) -> dict[str, str]:
        """The modality's own run params, besides `modality`."""
        return {}

    @classmethod
    @abc.abstractmethod
    def from_params(cls, params: Mapping[str, str]) -> Modality:
        """The instance whose `params()` a run recorded; LineageError when they are missing or unusable."""

    @abc.abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one encoded example."""

    def input_columns(self, frame: pd.DataFrame) -> tuple[str, ...]:
        """The columns of `frame` that hold its model input (`columns` unless the modality accepts
        alternatives, e.g. image paths instead of image bytes)."""
        return self.columns

    def embed_files(self, frame: pd.DataFrame, root: Path | None) -> pd.DataFrame:
        """`frame` with inputs that name files under `root` replaced by their contents, so that the
        batch an audit logs is self-contained (the correction reads it back from the run). Input
        columns that hold their data already are returned as they are; InvalidInput when a file
        cannot be read."""
        return frame

    @abc.abstractmethod
    def table(self, frame: pd.DataFrame, *, label_column: str = "label", tokenizer=None,
              root: Path | None = None) -> ExampleTable:
        """Encode `frame` (columns `example_id`, `label_column` and the input columns) into an
        ExampleTable with inputs [N, *input_shape()] and labels [N] int64. `tokenizer`: what text
        needs (the loaded model's); `root`: the folder relative image paths resolve in.
        InvalidInput in one sentence when a row cannot be encoded."""

    @abc.abstractmethod
    def input_checks(self, frame: pd.DataFrame, *, input_range: tuple[float, float] | None = None,
                     root: Path | None = None) -> list[InputCheck]:
        """The per-row checks of the input columns for the flagged-batch suite. Never raises on bad
        data; called only when every input column is present."""


@dataclass(frozen=True)
class Registration:
    """Handle returned by `register`: `remove()` (or leaving a `with` block) unregisters the modality."""

    modality: type[Modality]

    def remove(self) -> None:
        """Unregister the modality; a no-op if it is no longer the one registered under its name."""
        if _REGISTRY.get(self.modality.name) is self.modality:
            del _REGISTRY[self.modality.name]

    def __enter__(self) -> type[Modality]:
        return self.modality

    def __exit__(self, *exc: object) -> None:
        self.remove()


_REGISTRY: dict[str, type[Modality]] = {}


def register(modality: type[Modality]) -> Registration:
    """Make `modality` loadable wherever a run records `modality=<its name>`. Refuses a name that is
    already registered, so no modality is silently replaced."""
    if not (isinstance(modality, type) and issubclass(modality, Modality)):
        raise InvalidInput(f"register() takes a Modality subclass; got {modality!r}.")
    name = getattr(modality, "name", None)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"A modality's name must be lower-case letters, digits and '_', starting with a letter; "
                           f"{modality.__name__} has {name!r}.")
    if name in _REGISTRY:
        raise InvalidInput(f"Modality {name!r} is already registered; remove it before re-registering.")
    _REGISTRY[name] = modality
    return Registration(modality)


def _builtins() -> None:
    # Importing the package registers the built-in modalities; lazily, so their modules can import this one.
    importlib.import_module("audit.modalities")


def names() -> tuple[str, ...]:
    """Names of every registered modality, the built-ins first."""
    _builtins()
    return tuple(_REGISTRY)


def find(name: str) -> type[Modality] | None:
    """The modality registered as `name`, or None."""
    _builtins()
    return _REGISTRY.get(name) if isinstance(name, str) else None


def modality_from_params(params: Mapping[str, str]) -> Modality:
    """The modality a model's run records (`modality`, `pixels` when absent, and the modality's own
    params); LineageError when no registered modality has that name or its params are unusable."""
    name = params.get(MODALITY_PARAM, DEFAULT_MODALITY)
    modality = find(name)
    if modality is None:
        raise LineageError(f"The model's run records `{MODALITY_PARAM}` {name!r}, which this installation does "
                           f"not know (known modalities: {', '.join(names())}).")
    return modality.from_params(params)


def labels_of(frame: pd.DataFrame, label_column: str) -> torch.Tensor:
    """The `label_column` of `frame` as int64 [N]; InvalidInput when missing or not integers."""
    if label_column not in frame.columns:
        raise InvalidInput(f"The data has no `{label_column}` column.")
    try:
        return torch.tensor(frame[label_column].to_numpy(dtype="int64"))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"Every `{label_column}` must be an integer class index.") from exc


def ids_of(frame: pd.DataFrame) -> tuple[str, ...]:
    """The `example_id` column as strings; InvalidInput when missing."""
    if "example_id" not in frame.columns:
        raise InvalidInput("The data has no `example_id` column.")
    return tuple(str(i) for i in frame["example_id"])
