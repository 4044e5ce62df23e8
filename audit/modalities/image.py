"""The `image` modality: each example's input is an encoded picture (PNG, JPEG or any format
Pillow decodes): its bytes in column `image`, or a file named by column `image_path` relative to a
root folder the caller gives (a path escaping the root is refused). The transform is recorded with
the model (run params `image_size` "HxW", `image_mode` "L" or "RGB", `image_mean` / `image_std`
one value per channel): decode, convert to the mode, resize to H x W (bilinear), scale to [0, 1],
subtract the mean and divide by the std per channel. Inputs float32 [C, H, W], C = 1 (L) or 3 (RGB).
"""

from __future__ import annotations

import io
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

PATH_COLUMN = "image_path"
_CHANNELS = {"L": 1, "RGB": 3}


def _floats(values: str) -> tuple[float, ...]:
    return tuple(float(v) for v in values.split(","))


@dataclass(frozen=True)
class Image(Modality):
    """Encoded pictures, transformed as recorded: `size` (H, W), `mode` "L" or "RGB", `mean` and
    `std` one float per channel (std > 0)."""

    name: ClassVar[str] = "image"
    columns: ClassVar[tuple[str, ...]] = ("image",)

    size: tuple[int, int]
    mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.mode not in _CHANNELS:
            raise InvalidInput(f"An image modality's mode must be 'L' or 'RGB', got {self.mode!r}.")
        size, mean, std = tuple(self.size), tuple(map(float, self.mean)), tuple(map(float, self.std))
        channels = _CHANNELS[self.mode]
        if len(size) != 2 or not all(isinstance(d, int) and d > 0 for d in size):
            raise InvalidInput(f"An image modality's size must be two positive integers (H, W), got {self.size!r}.")
        if len(mean) != channels or len(std) != channels or not all(np.isfinite(mean)) or not all(
                np.isfinite(s) and s > 0 for s in std):
            raise InvalidInput(f"Mode {self.mode} needs {channels} finite mean and {channels} positive std "
                               f"values, got mean {self.mean!r} and std {self.std!r}.")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def params(self) -> dict[str, str]:
        return {"image_size": f"{self.size[0]}x{self.size[1]}", "image_mode": self.mode,
                "image_mean": ",".join(map(repr, self.mean)), "image_std": ",".join(map(repr, self.std))}

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Image:
        try:
            size = tuple(int(v) for v in params["image_size"].split("x"))
            return cls(size, params["image_mode"], _floats(params["image_mean"]), _floats(params["image_std"]))
        except (KeyError, ValueError, InvalidInput) as exc:
            raise LineageError("The model's run records modality `image` without usable `image_size`, `image_mode`, "
                               "`image_mean` and `image_std` params.") from exc

    def input_shape(self) -> tuple[int, ...]:
        return (_CHANNELS[self.mode], *self.size)

    def input_columns(self, frame: pd.DataFrame) -> tuple[str, ...]:
        """`image`, or `image_path` for a frame that has only that."""
        return (PATH_COLUMN,) if PATH_COLUMN in frame.columns and "image" not in frame.columns else self.columns

    def encode(self, data: bytes) -> torch.Tensor:
        """One encoded picture as float32 [C, H, W], transformed as recorded; InvalidInput when
        Pillow cannot decode it."""
        from PIL import Image as PILImage

        try:
            with PILImage.open(io.BytesIO(bytes(data))) as picture:
                picture = picture.convert(self.mode).resize((self.size[1], self.size[0]),
                                                            PILImage.Resampling.BILINEAR)
        except Exception as exc:  # any decoder failure is the data's fault: one sentence
            raise InvalidInput(f"Cannot decode a picture: {exc}".splitlines()[0]) from exc
        x = np.asarray(picture, dtype=np.float32) / 255.0
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        mean, std = (np.asarray(v, dtype=np.float32)[:, None, None] for v in (self.mean, self.std))
        return torch.from_numpy(np.ascontiguousarray((x - mean) / std))

    def table(self, frame: pd.DataFrame, *, label_column: str = "label", tokenizer=None,
              root: Path | None = None) -> ExampleTable:
        """Pictures as float32 [N, C, H, W]; InvalidInput naming the first example that cannot be
        read or decoded, or whose path escapes `root`."""
        ids = ids_of(frame)
        pictures = []
        for example_id, cell in zip(ids, self._cells(frame, root), strict=True):
            try:
                pictures.append(self.encode(cell()))
            except InvalidInput as exc:
                raise InvalidInput(f"Example {example_id!r}: {exc}") from exc
        inputs = torch.stack(pictures) if pictures else torch.zeros(0, *self.input_shape())
        return ExampleTable(ids, inputs, labels_of(frame, label_column))

    def input_checks(self, frame: pd.DataFrame, *, input_range: tuple[float, float] | None = None,
                     root: Path | None = None) -> list[InputCheck]:
        """Every `image` holds a picture Pillow decodes; or every `image_path` names such a file under `root`."""
        decodes = []
        for cell in self._cells(frame, root):
            try:
                self.encode(cell())
                decodes.append(True)
            except InvalidInput:
                decodes.append(False)
        if self.input_columns(frame) == (PATH_COLUMN,):
            where = "(none given)" if root is None else root
            return [InputCheck("image_readable", decodes,
                               f"every `{PATH_COLUMN}` names a picture file under the image root {where}")]
        return [InputCheck("image_readable", decodes, "every `image` holds an encoded picture that decodes")]

    def embed_files(self, frame: pd.DataFrame, root: Path | None) -> pd.DataFrame:
        """An `image_path` frame with an `image` column of the files' bytes instead (module docstring)."""
        if self.input_columns(frame) != (PATH_COLUMN,):
            return frame
        pictures = [cell() for cell in self._cells(frame, root)]
        return frame.drop(columns=[PATH_COLUMN]).assign(image=pictures)

    def _cells(self, frame: pd.DataFrame, root: Path | None) -> list:
        """Per row, a callable returning the picture's bytes (InvalidInput when it cannot be read)."""
        if self.input_columns(frame) == (PATH_COLUMN,):
            return [lambda p=p: read_under(root, p) for p in frame[PATH_COLUMN]]
        return [lambda b=b: _bytes(b) for b in frame["image"]]


def _bytes(cell: object) -> bytes:
    if not isinstance(cell, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"an `image` cell must hold the picture's bytes, not {type(cell).__name__}.")
    return bytes(cell)


def read_under(root: Path | None, path: object) -> bytes:
    """The bytes of the file `path` (relative) under `root`; InvalidInput when there is no root,
    the path escapes it (absolute, `..`, a link out) or names no file."""
    if root is None:
        raise InvalidInput("an `image_path` needs the root folder it is relative to, and none was given.")
    if not isinstance(path, str) or not path:
        raise InvalidInput(f"an `image_path` must be a relative path, got {path!r}.")
    base = Path(root).resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base):
        raise InvalidInput(f"image path {path!r} escapes the image root {root}.")
    if not target.is_file():
        raise InvalidInput(f"image path {path!r} names no file under {root}.")
    return target.read_bytes()


register(Image)
