"""Labelled example tables: ids, model inputs and labels held together, and their digests.

An `ExampleTable` is the in-memory form of every dataset the product touches (training data,
validation split, flagged batch). `dataset()` gives the map-style torch dataset that the
influence engine and training loops consume: item i is `(inputs[i], labels[i])`.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc
import torch
from torch.utils.data import TensorDataset

from audit.errors import InvalidInput


@dataclass(frozen=True)
class ExampleTable:
    """Labelled examples: `inputs` [N, *input_shape] (float32 pictures or features, int64 token ids
    for text), `labels` [N] int64. `display`: what a reviewer reads for each row when the input is
    not a picture (the text), else None."""

    ids: tuple[str, ...]
    inputs: torch.Tensor
    labels: torch.Tensor
    display: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.inputs.shape[0] != n or self.labels.shape[0] != n:
            raise InvalidInput(
                f"Example table needs as many inputs and labels as ids; found {n} ids, "
                f"{self.inputs.shape[0]} inputs and {self.labels.shape[0]} labels."
            )
        if self.display is not None and len(self.display) != n:
            raise InvalidInput(f"Example table needs one display text per id; found {n} ids and "
                               f"{len(self.display)} texts.")

    def __len__(self) -> int:
        return len(self.ids)

    def dataset(self) -> TensorDataset:
        """Map-style dataset yielding `(inputs[i], labels[i])`."""
        return TensorDataset(self.inputs, self.labels)

    def subset(self, index: np.ndarray | list[int]) -> ExampleTable:
        """Rows at `index` (positions, not ids), in that order."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        rows = idx.tolist()
        display = None if self.display is None else tuple(self.display[i] for i in rows)
        return ExampleTable(tuple(self.ids[i] for i in rows), self.inputs[idx], self.labels[idx], display)

    def positions(self, ids) -> list[int]:
        """Row positions of `ids`, in their order; InvalidInput naming the first id not in the table."""
        position = {example_id: n for n, example_id in enumerate(self.ids)}
        missing = next((i for i in ids if i not in position), None)
        if missing is not None:
            raise InvalidInput(f"Example {missing!r} is not in this table.")
        return [position[i] for i in ids]

    def with_labels(self, labels: torch.Tensor) -> ExampleTable:
        """The same examples with other labels (e.g. the reviewer's)."""
        return ExampleTable(self.ids, self.inputs, labels.to(torch.int64), self.display)

    def relabelled(self, relabels: dict[str, int]) -> ExampleTable:
        """The same examples with the labels of the ids in `relabels` replaced (a repair's edits)."""
        labels = self.labels.clone()
        for n, label in zip(self.positions(list(relabels)), relabels.values(), strict=True):
            labels[n] = label
        return self.with_labels(labels)


def pixel_frame(table: ExampleTable, label_column: str = "label") -> pd.DataFrame:
    """DataFrame with `example_id`, `pixels` (flattened list of floats) and `label_column`: the
    frame `audit.modalities.Pixels(shape).table` reads back."""
    flat = table.inputs.reshape(len(table), -1).to(torch.float64).numpy()
    return pd.DataFrame(
        {
            "example_id": list(table.ids),
            "pixels": [row.tolist() for row in flat],
            label_column: table.labels.numpy().astype(np.int64),
        }
    )


def content_digest(frame: pd.DataFrame) -> str:
    """SHA-256 (first 16 hex digits) of a frame's full content, list columns included.

    MLflow's own pandas digest skips list-valued columns (it would miss edited pixels), so the
    product records this digest instead. Independent of the pandas index and metadata.
    """
    table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    table = table.replace_schema_metadata(None).combine_chunks()
    sink = io.BytesIO()
    with pyarrow.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()[:16]
