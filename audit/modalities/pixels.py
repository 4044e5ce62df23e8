"""The `pixels` modality: each example's input is a flat list of floats in column `pixels`,
reshaped to the model's input shape (recorded as run param `input_shape` by ModelSpec). The
modality of every model logged before modalities were recorded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from audit.errors import InvalidInput, LineageError
from audit.examples import ExampleTable
from audit.modalities.registry import InputCheck, Modality, ids_of, labels_of, register

_FLOAT32_MAX = 3.4028234663852886e38
# Flagged pixels may lie outside the training range by this share of its width (at least of 1):
# room for a value rounded through float32 or text on its way to the batch, never a new scale.
RANGE_TOLERANCE = 1e-6


def _is_pixel(value: object) -> bool:
    """A plain real number the model's float32 input can hold (no string, list, bool or overflow)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(float(value)) and abs(float(value)) <= _FLOAT32_MAX


@dataclass(frozen=True)
class Pixels(Modality):
    """Flat float lists in column `pixels`, reshaped to `shape` (e.g. (1, 8, 8)); inputs float32."""

    name: ClassVar[str] = "pixels"
    columns: ClassVar[tuple[str, ...]] = ("pixels",)

    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if not shape or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
            raise InvalidInput(f"A pixels input shape must be positive integers, got {self.shape!r}.")
        object.__setattr__(self, "shape", tuple(int(d) for d in shape))

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Pixels:
        """From run param `input_shape` ("1x8x8")."""
        try:
            return cls(tuple(int(v) for v in params["input_shape"].split("x")))
        except (KeyError, ValueError, InvalidInput) as exc:
            raise LineageError("The model's run records no usable `input_shape` param (e.g. 1x8x8); "
                               "log it with model-audit's training helpers.") from exc

    def input_shape(self) -> tuple[int, ...]:
        return self.shape

    def table(self, frame: pd.DataFrame, *, label_column: str = "label", tokenizer=None,
              root: Path | None = None) -> ExampleTable:
        """Each `pixels` list reshaped to `shape`, float32; InvalidInput when a list has another length."""
        expected = math.prod(self.shape)
        try:
            pixels = [np.asarray(p, dtype=np.float32).ravel() for p in frame["pixels"]]
        except (TypeError, ValueError) as exc:
            raise InvalidInput("Every `pixels` cell must be a list of numbers.") from exc
        lengths = {len(p) for p in pixels}
        if lengths - {expected}:
            raise InvalidInput(
                f"Every `pixels` list must hold {expected} values for input shape {self.shape}; "
                f"found lengths {sorted(lengths)}."
            )
        inputs = torch.from_numpy(np.stack(pixels)) if pixels else torch.zeros(0, expected)
        return ExampleTable(ids_of(frame), inputs.reshape(len(frame), *self.shape), labels_of(frame, label_column))

    def input_checks(self, frame: pd.DataFrame, *, input_range: tuple[float, float] | None = None,
                     root: Path | None = None) -> list[InputCheck]:
        """Every list holds prod(shape) values, each a finite float32 number, and, when the model
        records its training range, within it give or take RANGE_TOLERANCE x max(1, max - min). A
        row whose values are not all finite numbers counts as in range: the finiteness check names it."""
        size = math.prod(self.shape)
        lists = [p if hasattr(p, "__len__") and not isinstance(p, (str, bytes, dict)) else [] for p in frame["pixels"]]
        finite = [bool(len(p)) and all(_is_pixel(v) for v in p) for p in lists]
        checks = [
            InputCheck("pixels_length", [len(p) == size for p in lists], f"every `pixels` list holds {size} values"),
            InputCheck("pixels_finite", finite, "every pixel value is a finite number within float32 range"),
        ]
        if input_range is not None:
            low, high = input_range
            slack = RANGE_TOLERANCE * max(1.0, high - low)
            checks.append(InputCheck(
                "pixels_in_range",
                [not ok or all(low - slack <= float(v) <= high + slack for v in p) for p, ok in zip(lists, finite,
                                                                                                    strict=True)],
                f"every `pixels` value within the model's training range [{low:g}, {high:g}]", counted="outside"))
        return checks


register(Pixels)
