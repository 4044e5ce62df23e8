"""Flagged batches: production mispredictions a reviewer labelled (DESIGN.md "Data contracts").

A batch is one Parquet or CSV file, or an inbox folder of them. Columns: `example_id`, the model
input in the columns of the model's modality (audit.modalities: `pixels`, a flattened list of
floats; `text`, a string; `image`, an encoded picture's bytes, or `image_path`), `predicted_label`,
`true_label` (the reviewer's label), optional `flagged_at`, `source`, `note`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from audit.errors import InvalidFlaggedBatch
from audit.examples import ExampleTable, content_digest, pixel_frame
from audit.modalities import Modality

OPTIONAL_COLUMNS = ("flagged_at", "source", "note")
BATCH_SUFFIXES = (".parquet", ".csv")


def required_columns(modality: Modality, frame: pd.DataFrame) -> tuple[str, ...]:
    """The columns a batch for a model of `modality` must have: `example_id`, the modality's input
    columns (as `frame` gives them: image bytes or paths), `predicted_label`, `true_label`."""
    return ("example_id", *modality.input_columns(frame), "predicted_label", "true_label")


def batch_files(location: Path) -> list[Path]:
    """The batch files at `location`: the file itself, or the sorted Parquet/CSV files of a folder."""
    location = Path(location)
    if location.is_file():
        return [location]
    if not location.is_dir():
        raise InvalidFlaggedBatch(f"No flagged batch at {location}: expected a Parquet/CSV file or an inbox folder.")
    return sorted(p for p in location.iterdir() if p.suffix in BATCH_SUFFIXES and p.is_file())


def read_batch_file(path: Path) -> pd.DataFrame:
    """One batch file as a DataFrame; CSV `pixels` cells hold JSON lists."""
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        frame = pd.read_csv(path)
        if "pixels" in frame.columns:
            frame["pixels"] = [json.loads(p) if isinstance(p, str) else p for p in frame["pixels"]]
    except Exception as exc:  # unreadable file or cell: the user's input, reported in one sentence
        raise InvalidFlaggedBatch(f"Cannot read flagged batch {path.name}: {exc}".splitlines()[0]) from exc
    return frame


def read_batch(files: list[Path], max_rows: int) -> pd.DataFrame:
    """The batch files as one frame. Row counts are taken first (Parquet metadata, CSV lines), so a
    batch over `max_rows` is refused before it is loaded (InvalidFlaggedBatch naming both counts);
    so is a file that cannot be read."""
    rows = sum(_row_count(f) for f in files)
    if rows > max_rows:
        raise InvalidFlaggedBatch(f"The flagged batch has {rows} rows, more than the {max_rows} an audit takes "
                                  "(`max_flagged`); split it into smaller batches.")
    return pd.concat([read_batch_file(f) for f in files], ignore_index=True)


def _row_count(path: Path) -> int:
    """Rows of one batch file without loading it (CSV: lines after the header, an upper bound when
    quoted cells span lines)."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        with open(path, "rb") as handle:
            return max(sum(1 for _ in handle) - 1, 0)
    except Exception as exc:  # unreadable: the same sentence as reading it would give
        raise InvalidFlaggedBatch(f"Cannot read flagged batch {path.name}: {exc}".splitlines()[0]) from exc


def write_batch(frame: pd.DataFrame, path: Path) -> Path:
    """Write a flagged batch as Parquet (creating the folder); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def flagged_frame(table: ExampleTable, predicted: torch.Tensor, source: str = "") -> pd.DataFrame:
    """Flagged-batch DataFrame of a pixels model for `table` (labels = reviewer's labels) and the
    model's predictions [N]."""
    frame = pixel_frame(table, label_column="true_label")
    frame.insert(2, "predicted_label", predicted.numpy().astype("int64"))
    return frame.assign(flagged_at=pd.Timestamp.now(tz="UTC"), source=source)


def flagged_table(frame: pd.DataFrame, encode: Callable[..., ExampleTable]) -> tuple[ExampleTable, torch.Tensor]:
    """A validated batch as (examples labelled with the reviewer's labels, predicted labels [N]).
    `encode(frame, label_column=...)` encodes the input columns: the loaded model's `spec.table`
    (text needs its tokenizer), or a modality's `table`."""
    table = encode(frame, label_column="true_label")
    return table, torch.tensor(frame["predicted_label"].to_numpy(dtype="int64"))


def batch_digest(frame: pd.DataFrame, modality: Modality) -> str:
    """Content digest of the batch's required columns for `modality` (tag `audit.flagged_digest`);
    KeyError when one is missing."""
    return content_digest(frame[list(required_columns(modality, frame))])
