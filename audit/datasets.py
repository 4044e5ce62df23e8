"""Training data read where it lives, in chunks, with a streaming content digest.

A `DataSource` names labelled examples by reference: a local path or an fsspec URL (`file://`,
`s3://`, `memory://`, ...), one of `FORMATS` and, optionally, column renames. Reading it yields
pandas frames of at most `chunk_rows` rows with the columns `example_id` (str), `label` (int64)
and the input columns (e.g. `text`, `pixels`, `image`), so that a large split never sits in
memory whole as a frame:

- `parquet`: one Parquet file, or every `*.parquet` / `*.parq` file under a directory (names
  starting with `_` or `.` skipped, e.g. `_SUCCESS`), in sorted path order; read with
  `pyarrow.parquet.ParquetFile.iter_batches`, only the columns used. Hive partition columns
  (`key=value` folder names) are not read.
- `huggingface`: one split of a Hugging Face `datasets` dataset written with `save_to_disk` (the
  folder holding `state.json`). Its Arrow files (`state.json`'s `_data_files`, in order) are read
  with pyarrow directly: `datasets` is not needed to read it. An `Image` feature column (a struct
  with `bytes`) is read as its bytes.
- `imagefolder`: `root/<class>/<file>` as torchvision's `ImageFolder` lays it out: `label` = the
  index of the class folder among the sorted class folders, `example_id` = the file's path
  relative to `root` (`/`-separated), `image` = the file's bytes; files with an image extension
  (`IMAGE_EXTENSIONS`, any depth under the class folder) in sorted path order. A class folder
  without any image is refused, as torchvision does.

`columns` maps source column names to the names above, e.g. SST-2 saved to disk:
`{"idx": "example_id", "sentence": "text"}`; `inputs` names the input columns to read (after
renaming; default: every column but `example_id` and `label`, in source order). Integer ids are
read as their decimal strings.

Content digest (`ContentDigest`, 16 hex digits of SHA-256): covers the number of rows, the
column names in order (`example_id`, `label`, then the input columns) and every value of every
column in row order. Each column is hashed as separate streams of canonical bytes: integers
(and booleans) as int64 little-endian, floats as float64 little-endian, strings (UTF-8) and
binary as one stream of int64 lengths plus one of the concatenated bytes, lists as one stream of
int64 lengths per nesting level plus the flattened values. So the digest does not depend on the
chunk size, the file layout (one Parquet file or many), the physical width of a type (int32 vs
int64, float32 vs float64, string vs large_string) or the format the rows came from: the same
rows read from Parquet and from a Hugging Face dataset have the same digest. Missing values are
refused (InvalidInput), they would make the encoding ambiguous.

No MLflow here: registry_hooks.lineage records a source and its digest on a run and reads it back.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from audit.errors import InvalidInput, LineageError

FORMATS = ("parquet", "huggingface", "imagefolder")
ID, LABEL = "example_id", "label"
IMAGE = "image"
CHUNK_ROWS = 1024
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PARQUET_SUFFIXES = (".parquet", ".parq")
DIGEST_VERSION = "model-audit content digest v1"


class SourceMissing(LineageError):
    """Nothing is at the source's path or URL (deleted or moved)."""


@dataclass(frozen=True)
class DataSource:
    """Labelled examples by reference. `uri`: a local path or an fsspec URL; `format`: one of
    `FORMATS`; `columns`: source column name -> product name (`example_id`, `label`, an input
    column); `inputs`: the input columns to read, after renaming (None: every other column, at
    least one; `()`: ids and labels only, e.g. a repair's label edits).
    `to_dict()` is what a run records, `from_dict` reads it back."""

    uri: str
    format: str = "parquet"
    columns: Mapping[str, str] = field(default_factory=dict)
    inputs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.uri, PathLike):
            object.__setattr__(self, "uri", str(self.uri))
        if not isinstance(self.uri, str) or not self.uri:
            raise InvalidInput(f"A data source needs a path or URL; got {self.uri!r}.")
        if self.format not in FORMATS:
            raise InvalidInput(f"Unknown data format {self.format!r}; use one of {', '.join(FORMATS)}.")
        columns = dict(self.columns or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
            raise InvalidInput(f"Column renames map source names to product names, both strings; got {columns!r}.")
        if len(set(columns.values())) != len(columns):
            raise InvalidInput(f"Column renames {columns!r} give two source columns the same name.")
        object.__setattr__(self, "columns", columns)
        if self.inputs is not None:
            inputs = tuple(self.inputs)
            if isinstance(self.inputs, str) or not all(isinstance(c, str) for c in inputs):
                raise InvalidInput(f"`inputs` names one or more input columns; got {self.inputs!r}.")
            if {ID, LABEL} & set(inputs) or len(set(inputs)) != len(inputs):
                raise InvalidInput(f"`inputs` {list(inputs)} must name distinct columns other than "
                                   f"`{ID}` and `{LABEL}`.")
            object.__setattr__(self, "inputs", inputs)

    def to_dict(self) -> dict:
        """JSON-ready description: `uri`, `format`, `columns`, `inputs` (a list or None)."""
        return {"uri": self.uri, "format": self.format, "columns": dict(self.columns),
                "inputs": None if self.inputs is None else list(self.inputs)}

    @classmethod
    def from_dict(cls, description: Mapping) -> DataSource:
        """Inverse of `to_dict` (other keys ignored); InvalidInput when it is not one."""
        try:
            inputs = description.get("inputs")
            return cls(description["uri"], description["format"], description.get("columns") or {},
                       None if inputs is None else tuple(inputs))
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"Not a data source description: {description!r}.") from exc


@dataclass(frozen=True)
class DataSummary:
    """One full pass over a source: its content digest, number of rows and the Arrow schema of
    the columns read (`example_id`, `label`, the inputs, as the first chunk has them)."""

    digest: str
    num_rows: int
    schema: pa.Schema


class ContentDigest:
    """Streaming content digest (module docstring): `update` with each chunk, in order, then
    `hexdigest()`. The same rows give the same digest however they are split into chunks."""

    def __init__(self) -> None:
        self._columns: list[str] | None = None
        self._streams: dict[str, hashlib._Hash] = {}
        self.rows = 0

    def update(self, table: pa.Table) -> None:
        """Add the next rows (a table with the columns of the first chunk, in the same order)."""
        if self._columns is None:
            self._columns = list(table.column_names)
        elif list(table.column_names) != self._columns:
            raise InvalidInput(f"Chunk columns {table.column_names} differ from the first chunk's {self._columns}.")
        for name in self._columns:
            column = table.column(name)
            for chunk in column.chunks or [pa.array([], column.type)]:
                self._feed(name, name, chunk)
        self.rows += table.num_rows

    def hexdigest(self) -> str:
        """16 hex digits of SHA-256 over the row count, the column names and every stream's hash."""
        streams = [[key, stream.hexdigest()] for key, stream in self._streams.items()]
        header = {"digest": DIGEST_VERSION, "rows": self.rows, "columns": self._columns or [], "streams": streams}
        return hashlib.sha256(json.dumps(header).encode()).hexdigest()[:16]

    def _stream(self, key: str) -> hashlib._Hash:
        return self._streams.setdefault(key, hashlib.sha256())

    def _feed(self, column: str, key: str, array: pa.Array) -> None:
        if array.null_count:
            raise InvalidInput(f"Column `{column}` has missing values; every example needs a value.")
        kind = array.type
        if isinstance(array, pa.DictionaryArray):
            self._feed(column, key, array.dictionary_decode())
        elif pa.types.is_integer(kind) or pa.types.is_boolean(kind):
            self._stream(f"{key}:int64").update(_le(array.cast(pa.int64()), "<i8"))
        elif pa.types.is_floating(kind):
            self._stream(f"{key}:float64").update(_le(array.cast(pa.float64()), "<f8"))
        elif _is_bytes_like(kind):
            lengths, data = _lengths_and_bytes(array)
            self._stream(f"{key}:length").update(lengths.astype("<i8").tobytes())
            self._stream(f"{key}:bytes").update(data)
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            lengths = pc.list_value_length(array).cast(pa.int64())
            self._stream(f"{key}:length").update(_le(lengths, "<i8"))
            self._feed(column, f"{key}[]", array.flatten())
        else:
            raise InvalidInput(f"Column `{column}` has type {kind}, which model-audit cannot digest; use numbers, "
                               "strings, bytes or lists of them.")


def read_tables(source: DataSource, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """The source's rows as Arrow tables of `chunk_rows` rows (the last one fewer), with the
    columns `example_id` (string), `label` (int64) and the input columns, in that order.
    SourceMissing when nothing is at `source.uri`; LineageError when a file cannot be read;
    InvalidInput for a missing column or an unusable type."""
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise InvalidInput(f"chunk_rows must be a positive integer; got {chunk_rows!r}.")
    fs, path = _filesystem(source.uri)
    if not fs.exists(path):
        raise SourceMissing(f"No data at {source.uri}.")
    if source.format == "parquet":
        raw = _parquet_tables(fs, path, source, chunk_rows)
    elif source.format == "huggingface":
        raw = _huggingface_tables(fs, path, source)
    else:
        raw = _image_folder_tables(fs, path, source, chunk_rows)
    return _rebatch((_select(table, source) for table in raw), chunk_rows)


def iter_frames(source: DataSource, chunk_rows: int = CHUNK_ROWS,
                digest: ContentDigest | None = None) -> Iterator[pd.DataFrame]:
    """`read_tables` as pandas frames (`example_id` str, `label` int64, inputs: str, bytes, or
    numpy arrays for lists); each chunk goes into `digest` first when one is given."""
    for table in read_tables(source, chunk_rows):
        if digest is not None:
            digest.update(table)
        yield table.to_pandas()


def summarize(source: DataSource, chunk_rows: int = CHUNK_ROWS) -> DataSummary:
    """Digest, row count and schema of the source, in one streaming pass; InvalidInput when it holds no rows."""
    digest, schema = ContentDigest(), None
    for table in read_tables(source, chunk_rows):
        schema = schema or table.schema
        digest.update(table)
    if schema is None or digest.rows == 0:
        raise InvalidInput(f"The {source.format} data at {source.uri} holds no examples.")
    return DataSummary(digest.hexdigest(), digest.rows, schema)


def frame_digest(frame: pd.DataFrame, inputs: Sequence[str] | None = None) -> str:
    """The content digest of an in-memory frame (`example_id`, `label`, the input columns): the
    digest its rows have when read back from any source."""
    source = DataSource("<frame>", inputs=None if inputs is None else tuple(inputs))
    table = _select(pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False), source)
    digest = ContentDigest()
    digest.update(table)
    return digest.hexdigest()


# -- reading ------------------------------------------------------------------------------------


def _filesystem(uri: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:  # unknown protocol, or its fsspec backend not installed
        raise LineageError(f"Cannot open {uri} ({exc}).") from exc


def _source_columns(source: DataSource) -> list[str] | None:
    """The source column names to read (None: all)."""
    if source.inputs is None:
        return None
    renamed = {v: k for k, v in source.columns.items()}
    return [renamed.get(name, name) for name in (ID, LABEL, *source.inputs)]


def _parquet_tables(fs, path: str, source: DataSource, chunk_rows: int) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    if fs.isdir(path):
        files = sorted(f for f in fs.find(path) if f.endswith(PARQUET_SUFFIXES)
                       and not any(part.startswith(("_", ".")) for part in f[len(path):].split("/") if part))
        if not files:
            raise LineageError(f"The folder {source.uri} holds no Parquet files.")
    else:
        files = [path]
    wanted = _source_columns(source)
    for name in files:
        try:
            with fs.open(name, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                # all columns when one is missing, so that the refusal lists what the file has
                columns = wanted if wanted is not None and set(wanted) <= set(parquet.schema_arrow.names) else None
                for batch in parquet.iter_batches(batch_size=chunk_rows, columns=columns):
                    yield pa.Table.from_batches([batch])
        except FileNotFoundError as exc:
            raise SourceMissing(f"No data at {name}.") from exc
        except (OSError, pa.ArrowException) as exc:
            raise LineageError(f"Cannot read {name} as Parquet ({exc}).") from exc


def _huggingface_tables(fs, path: str, source: DataSource) -> Iterator[pa.Table]:
    if fs.exists(posixpath.join(path, "dataset_dict.json")):
        splits = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if fs.isdir(p))
        example = f"{source.uri.rstrip('/')}/{splits[0] if splits else 'train'}"
        raise InvalidInput(f"{source.uri} is a DatasetDict saved to disk (splits: {', '.join(splits)}); "
                           f"point at one split's folder, e.g. {example}.")
    try:
        with fs.open(posixpath.join(path, "state.json"), "r") as handle:
            files = [entry["filename"] for entry in json.load(handle)["_data_files"]]
    except FileNotFoundError as exc:
        raise LineageError(f"{source.uri} is not a Hugging Face dataset saved with save_to_disk "
                           "(it has no state.json).") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LineageError(f"Cannot read the state.json of the Hugging Face dataset at {source.uri} ({exc}).") from exc
    for filename in files:
        name = posixpath.join(path, filename)
        try:
            with fs.open(name, "rb") as handle:
                for batch in _arrow_batches(handle):
                    yield pa.Table.from_batches([batch])
        except FileNotFoundError as exc:
            raise SourceMissing(f"No data at {name}.") from exc
        except (OSError, pa.ArrowException) as exc:
            raise LineageError(f"Cannot read {name} as Arrow data ({exc}).") from exc


def _arrow_batches(handle) -> Iterator[pa.RecordBatch]:
    """Record batches of an Arrow IPC stream (what `datasets` writes) or, failing that, file."""
    import pyarrow.ipc

    try:
        reader = pyarrow.ipc.open_stream(handle)
    except pa.ArrowInvalid:
        handle.seek(0)
        reader = pyarrow.ipc.open_file(handle)
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        return
    yield from reader


def _image_folder_tables(fs, path: str, source: DataSource, chunk_rows: int) -> Iterator[pa.Table]:
    root = path.rstrip("/")
    classes = sorted(posixpath.basename(entry["name"].rstrip("/")) for entry in fs.ls(root, detail=True)
                     if entry["type"] == "directory")
    classes = [c for c in classes if not c.startswith(".")]
    if not classes:
        raise InvalidInput(f"The image folder {source.uri} has no class folders (root/<class>/<image file>).")
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        found = sorted(f for f in fs.find(f"{root}/{name}") if f.lower().endswith(IMAGE_EXTENSIONS)
                       and not any(part.startswith(".") for part in f[len(root) + 1:].split("/")))
        if not found:
            raise InvalidInput(f"The class folder {name!r} of the image folder {source.uri} holds no image files "
                               f"({', '.join(IMAGE_EXTENSIONS)}).")
        files += [(f, label) for f in found]
    for start in range(0, len(files), chunk_rows):
        part = files[start:start + chunk_rows]
        try:
            data = [fs.cat_file(name) for name, _ in part]
        except FileNotFoundError as exc:
            raise SourceMissing(f"No data at {exc.filename or source.uri}.") from exc
        except OSError as exc:
            raise LineageError(f"Cannot read an image of the image folder {source.uri} ({exc}).") from exc
        yield pa.table({ID: pa.array([name[len(root) + 1:] for name, _ in part], pa.string()),
                        LABEL: pa.array([label for _, label in part], pa.int64()),
                        IMAGE: pa.array(data, pa.binary())})


# -- normalizing --------------------------------------------------------------------------------


def _select(table: pa.Table, source: DataSource) -> pa.Table:
    """Renamed, reduced to `example_id`, `label`, the inputs (in that order), types normalized."""
    absent = [name for name in source.columns if name not in table.column_names]
    if absent:
        raise InvalidInput(f"The {source.format} data at {source.uri} has no column {absent[0]!r} to rename "
                           f"(it has {', '.join(table.column_names)}).")
    names = [source.columns.get(name, name) for name in table.column_names]
    if len(set(names)) != len(names):
        raise InvalidInput(f"Renaming the columns of {source.uri} with {dict(source.columns)} gives two columns "
                           f"the same name ({', '.join(names)}).")
    table = table.rename_columns(names)
    inputs = list(source.inputs) if source.inputs is not None else [n for n in names if n not in (ID, LABEL)]
    missing = [name for name in (ID, LABEL, *inputs) if name not in names]
    if missing:
        raise InvalidInput(
            f"The {source.format} data at {source.uri} has no column {', '.join(f'`{m}`' for m in missing)} "
            f"(it has {', '.join(names)}); map source columns to these names with `columns`, "
            f"e.g. {{'sentence': 'text', 'idx': 'example_id'}}.")
    if not inputs and source.inputs is None:
        raise InvalidInput(f"The {source.format} data at {source.uri} has no input column besides `{ID}` "
                           f"and `{LABEL}`.")
    ids = _ids(table.column(ID))
    labels = table.column(LABEL)
    if not pa.types.is_integer(labels.type):
        raise InvalidInput(f"Column `{LABEL}` of {source.uri} must hold integer class indices; found {labels.type}.")
    columns = [ids, labels.cast(pa.int64())] + [_input(table.column(name), name) for name in inputs]
    return pa.table(columns, names=[ID, LABEL, *inputs])


def _ids(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_integer(column.type) or pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    raise InvalidInput(f"Column `{ID}` must hold strings or integers; found {column.type}.")


def _input(column: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    """Physical variants folded: dictionary decoded, Hugging Face `Image` structs to their bytes,
    large strings/binaries/lists to the plain ones, fixed-size lists to lists."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        return _input(pa.chunked_array([c.dictionary_decode() for c in column.chunks], kind.value_type), name)
    if pa.types.is_struct(kind):
        if kind.get_field_index("bytes") < 0:
            raise InvalidInput(f"Column `{name}` holds records ({kind}); only Hugging Face Image records "
                               "(with `bytes`) can be read.")
        return _input(pc.struct_field(column, "bytes"), name)
    if pa.types.is_large_string(kind):
        return column.cast(pa.string())
    if pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        return column.cast(pa.binary())
    if pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return column.cast(pa.list_(kind.value_type))
    return column


def _rebatch(tables: Iterable[pa.Table], chunk_rows: int) -> Iterator[pa.Table]:
    """Tables of exactly `chunk_rows` rows (the last one fewer), whatever sizes come in."""
    pending: list[pa.Table] = []
    count = 0
    for table in tables:
        while table.num_rows:
            take = min(chunk_rows - count, table.num_rows)
            pending.append(table.slice(0, take))
            count += take
            table = table.slice(take)
            if count == chunk_rows:
                yield _concat(pending)
                pending, count = [], 0
    if pending:
        yield _concat(pending)


def _concat(tables: list[pa.Table]) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")


def _is_bytes_like(kind: pa.DataType) -> bool:
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind))


def _le(array: pa.Array, dtype: str) -> bytes:
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=dtype).tobytes()


def _lengths_and_bytes(array: pa.Array) -> tuple[np.ndarray, memoryview | bytes]:
    """Per-value byte lengths and the values' bytes concatenated, of a string/binary array."""
    wide = array.cast(pa.large_binary())
    _, offsets_buffer, data = wide.buffers()
    if offsets_buffer is None:
        return np.zeros(0, dtype=np.int64), b""
    offsets = np.frombuffer(offsets_buffer, dtype="<i8")[wide.offset:wide.offset + len(wide) + 1]
    if len(offsets) == 0 or data is None:
        return np.zeros(len(wide), dtype=np.int64), b""
    return np.diff(offsets), memoryview(data)[int(offsets[0]):int(offsets[-1])]
