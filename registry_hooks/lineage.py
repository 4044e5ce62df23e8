"""Training-data lineage: the data a model was trained on, recorded with the model's run and
recovered (digest-checked, in chunks) by audits.

Layout of a model's run, for each split `train` and `validation`:
- an MLflow dataset input named after the split (context `training` / `validation`): digest =
  the content digest of `audit.datasets` (ids, labels and input columns, in order), schema = the
  columns read, profile = the number of rows, source (JSON) = where the data is: the
  `audit.datasets.DataSource` description (`uri`, `format`, `columns` renames, `inputs`), plus
  `run_id` and `artifact_path` when the data is a copy in a run's artifacts;
- run tag `audit.data.<split>` (registry_hooks.tags.DATA_SOURCE): the same JSON. MLflow keeps one
  dataset record per experiment, name and digest, with the source of the first run that logged
  it, so the tag is what says where *this* run's data is; the dataset input shows it in the UI.

Data is recorded by reference (`log_training_reference`: a Parquet file or folder, a Hugging
Face dataset saved to disk, an image folder; a local path or an fsspec URL; nothing copied) or,
for small data, copied into the run as `data/<split>.parquet` (`log_training_data`). A repaired
version's run (`log_derived_training_data`) re-records its source run's splits, unchanged, plus
its label edits: artifact `data/relabels.parquet` (`example_id`, `label`), dataset input and tag
`relabels`; the edits of a chain of repairs are composed into that one file.

Runs logged before this layout (a pandas dataset input whose digest is
`audit.examples.content_digest` of the whole `data/<split>.parquet` artifact) are still read.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pandas as pd
import pyarrow as pa
import torch
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput
from mlflow.tracking import MlflowClient

from audit.datasets import (
    CHUNK_ROWS,
    ContentDigest,
    DataSource,
    DataSummary,
    SourceMissing,
    iter_frames,
    summarize,
)
from audit.errors import AuditError, InvalidInput, LineageError
from audit.examples import ExampleTable, content_digest, pixel_frame
from registry_hooks.model_io import ModelSpec
from registry_hooks.tags import DATA_SOURCE

SPLITS = ("train", "validation")
RELABELS = "relabels"
RELABELS_ARTIFACT = "data/relabels.parquet"
CONTEXTS = {"train": "training", "validation": "validation", RELABELS: "training"}
REFUSAL = "refusing to audit without the data the model was trained on"


@dataclass(frozen=True)
class TrainingData:
    """The splits a model version was trained and validated on, with their digests (`train`,
    `validation`, and `relabels` for a repaired version) and the label edits applied to `train`
    (example_id -> label; empty unless the version is a repair)."""

    train: ExampleTable
    validation: ExampleTable
    digests: dict[str, str]
    relabels: dict[str, int] = field(default_factory=dict)


def log_training_data(train: ExampleTable | pd.DataFrame, validation: ExampleTable | pd.DataFrame,
                      *, inputs: Sequence[str] | None = None) -> dict[str, str]:
    """Copy both splits into the active run as `data/<split>.parquet` and record them (dataset
    input + tag, module docstring); returns the digests by split. For small data: large data is
    better recorded where it lives (`log_training_reference`). A split is an `ExampleTable` of
    pictures (written as flat `pixels` lists, `audit.examples.pixel_frame`) or a frame with
    `example_id`, `label` and input columns (`inputs`; default every other column). InvalidInput,
    before anything is logged, when a frame lacks a column or there is no active run."""
    run_id = _active_run_id()
    frames = {split: pixel_frame(data) if isinstance(data, ExampleTable) else data
              for split, data in zip(SPLITS, (train, validation), strict=True)}
    digests = {}
    with tempfile.TemporaryDirectory() as tmp:
        written = {}
        for split, frame in frames.items():
            if not isinstance(frame, pd.DataFrame):
                raise InvalidInput(f"The {split} split must be an ExampleTable or a DataFrame; "
                                   f"got {type(frame).__name__}.")
            path = Path(tmp) / f"{split}.parquet"
            frame.to_parquet(path, index=False)
            local = DataSource(str(path), "parquet", {}, None if inputs is None else tuple(inputs))
            written[split] = (path, local, summarize(local))
        for split, (path, local, summary) in written.items():
            mlflow.log_artifact(str(path), artifact_path="data")
            artifact_path = f"data/{split}.parquet"
            described = replace(local, uri=mlflow.get_artifact_uri(artifact_path)).to_dict()
            _record(split, described | {"run_id": run_id, "artifact_path": artifact_path}, summary)
            digests[split] = summary.digest
    return digests


def log_training_reference(train: str | Path, validation: str | Path, format: str = "parquet",
                           columns: Mapping[str, str] | None = None, inputs: Sequence[str] | None = None,
                           *, chunk_rows: int = CHUNK_ROWS) -> dict[str, str]:
    """Record both splits in the active run by reference, nothing copied: each is read once, in
    chunks, for its digest, schema and row count (module docstring). `train` / `validation`: a
    local path (recorded absolute) or an fsspec URL; `format`: "parquet", "huggingface" (a
    `datasets` split saved with `save_to_disk`) or "imagefolder" (audit.datasets); `columns`:
    source name -> `example_id` / `label` / input name, e.g. {"idx": "example_id", "sentence":
    "text"}; `inputs`: the input columns (after renaming; default every other column). Returns
    the digests by split. InvalidInput / LineageError, before anything is logged, when a split
    is missing, unreadable, empty or lacks a column."""
    _active_run_id()
    sources = {split: DataSource(_absolute(location), format, dict(columns or {}),
                                 None if inputs is None else tuple(inputs))
               for split, location in zip(SPLITS, (train, validation), strict=True)}
    summaries = {split: summarize(source, chunk_rows) for split, source in sources.items()}
    for split, source in sources.items():
        _record(split, source.to_dict(), summaries[split])
    return {split: summary.digest for split, summary in summaries.items()}


def log_derived_training_data(source_run_id: str, relabels: Mapping[str, int]) -> dict[str, str]:
    """Record in the active run (a repaired version's) the training data of `source_run_id` with
    the label edits `relabels` (example_id -> label): the source run's `train` / `validation`
    records are re-recorded as they are (same source, digest, schema, format; nothing copied)
    and the edits, composed with the source run's own (a repair of a repair: later edits win),
    are written to `data/relabels.parquet` with their own dataset input and digest. Returns the
    digests (`train`, `validation`, and `relabels` when there are edits). LineageError when the
    source run has no recoverable lineage; InvalidInput for edits that are not str -> int."""
    run_id = _active_run_id()
    edits = _checked_relabels(relabels)
    client = MlflowClient()
    source = _run(source_run_id)
    recorded = _dataset_inputs(source)
    for split in SPLITS:
        _require(recorded, split, source_run_id)
    prior = _read_relabels(source, recorded, CHUNK_ROWS)
    composed = dict(sorted(((prior[0] if prior else {}) | edits).items()))
    digests = {}
    for split in SPLITS:
        dataset_input = recorded[split]
        described = _description(source, split, dataset_input.dataset)
        if described is None:  # a run logged before this layout: its copy, read as it was digested
            described = {"legacy": True, "run_id": source_run_id, "artifact_path": f"data/{split}.parquet",
                         "uri": json.loads(dataset_input.dataset.source).get("uri", "")}
        mlflow.set_tag(DATA_SOURCE.format(split=split), json.dumps(described))
        client.log_inputs(run_id, [DatasetInput(dataset_input.dataset, dataset_input.tags)])
        digests[split] = dataset_input.dataset.digest
    if composed:
        frame = pd.DataFrame({"example_id": list(composed), "label": list(composed.values())})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(RELABELS_ARTIFACT).name
            frame.to_parquet(path, index=False)
            summary = summarize(DataSource(str(path), "parquet", {}, ()))
            mlflow.log_artifact(str(path), artifact_path=str(Path(RELABELS_ARTIFACT).parent))
        described = DataSource(mlflow.get_artifact_uri(RELABELS_ARTIFACT), "parquet", {}, ()).to_dict()
        _record(RELABELS, described | {"run_id": run_id, "artifact_path": RELABELS_ARTIFACT}, summary)
        digests[RELABELS] = summary.digest
    return digests


def recover_training_data(run_id: str, spec: ModelSpec, *, chunk_rows: int = CHUNK_ROWS) -> TrainingData:
    """A run's training and validation splits, read from wherever its records point (its
    artifacts for a copy, the path or URL for a reference) in chunks of `chunk_rows` rows, each
    chunk encoded with `spec.table` (inputs [N, *spec.input_shape]); every split's digest checked
    against the one recorded at training time, and a repair's label edits (digest-checked too)
    applied to `train`. LineageError, in one sentence, when a split is not recorded, its source
    is gone or unreadable, or its content changed."""
    run = _run(run_id)
    recorded = _dataset_inputs(run)
    tables, digests = {}, {}
    for split in SPLITS:
        dataset = _require(recorded, split, run_id).dataset
        described = _description(run, split, dataset)
        parts, digests[split] = _scan(run_id, split, described, dataset.digest, chunk_rows, spec.table)
        tables[split] = _concatenated(parts)
    relabels: dict[str, int] = {}
    found = _read_relabels(run, recorded, chunk_rows)
    if found is not None:
        relabels, digests[RELABELS] = found
        try:
            tables["train"] = tables["train"].relabelled(relabels)
        except InvalidInput as exc:
            raise LineageError(f"The label edits of run {run_id} name an example its training data does not have "
                               f"({_clause(exc)}); {REFUSAL}.") from exc
    return TrainingData(tables["train"], tables["validation"], digests, relabels)


# -- recording ----------------------------------------------------------------------------------


class _RecordedSource(DatasetSource):
    """An MLflow dataset source whose JSON is a DataSource description (module docstring);
    source type "local" for local paths and file: URIs, else the URL scheme."""

    def __init__(self, description: Mapping) -> None:
        self._description = dict(description)

    def _get_source_type(self) -> str:  # an instance method: the type follows the URI
        scheme = urlparse(str(self._description.get("uri", ""))).scheme
        return "local" if scheme in ("", "file") or len(scheme) == 1 else scheme

    def load(self, dst_path=None) -> str:
        return str(self._description["uri"])

    @staticmethod
    def _can_resolve(raw_source) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source) -> _RecordedSource:
        raise NotImplementedError("model-audit sources are built from a description, not resolved")

    def to_dict(self) -> dict:
        return dict(self._description)

    @classmethod
    def from_dict(cls, source_dict: Mapping) -> _RecordedSource:
        return cls(source_dict)


class _RecordedDataset(MetaDataset):
    """A dataset MLflow records by source, digest, schema and row count, without holding the data."""

    def __init__(self, source: DatasetSource, name: str, summary: DataSummary) -> None:
        self._num_rows = summary.num_rows
        super().__init__(source, name=name, digest=summary.digest, schema=_mlflow_schema(summary.schema))

    @property
    def profile(self) -> dict:
        return {"num_rows": self._num_rows}

    def to_dict(self) -> dict[str, str]:
        return super().to_dict() | {"profile": json.dumps(self.profile)}


def _record(name: str, described: dict, summary: DataSummary) -> None:
    """Tag + dataset input `name` of the active run for the data `described`."""
    mlflow.set_tag(DATA_SOURCE.format(split=name), json.dumps(described))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mlflow.log_input(_RecordedDataset(_RecordedSource(described), name, summary), context=CONTEXTS[name])


def _mlflow_schema(schema: pa.Schema):
    """The MLflow column schema of the columns read (None when a type has no MLflow equivalent)."""
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    def kind(t: pa.DataType):
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return DataType.string
        if pa.types.is_boolean(t):
            return DataType.boolean
        if pa.types.is_integer(t):
            return DataType.long
        if pa.types.is_floating(t):
            return DataType.double
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return DataType.binary
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return Array(kind(t.value_type))
        raise TypeError(t)

    try:
        return Schema([ColSpec(kind(f.type), f.name) for f in schema])
    except (TypeError, ValueError, AuditError):
        return None


def _active_run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        raise InvalidInput("Recording training data needs an active MLflow run (inside `mlflow.start_run()`).")
    return run.info.run_id


def _absolute(location: str | Path) -> str:
    """Local paths made absolute (a recorded relative path would depend on the audit's working
    directory); URLs as given."""
    text = str(location)
    return text if "://" in text else str(Path(text).expanduser().resolve())


def _checked_relabels(relabels: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(relabels, Mapping):
        raise InvalidInput(f"Label edits map example ids to labels; got {type(relabels).__name__}.")
    checked = {}
    for example_id, label in relabels.items():
        if not isinstance(example_id, str) or isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise InvalidInput(f"Label edit {example_id!r}: {label!r} must map a string id to a class index.")
        checked[example_id] = int(label)
    return checked


# -- reading ------------------------------------------------------------------------------------


def _run(run_id: str):
    try:
        return MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise LineageError(f"No run {run_id} in this MLflow store to recover training data from.") from exc


def _dataset_inputs(run) -> dict:
    return {d.dataset.name: d for d in run.inputs.dataset_inputs}


def _require(recorded: dict, split: str, run_id: str):
    if split not in recorded:
        raise LineageError(f"Run {run_id} records no `{split}` dataset input; cannot recover its training data.")
    return recorded[split]


def _description(run, name: str, dataset) -> dict | None:
    """Where the run's data `name` is: its tag, else its dataset input's source when that is a
    description; None for a run logged before this layout."""
    for text in (run.data.tags.get(DATA_SOURCE.format(split=name)), dataset.source):
        try:
            described = json.loads(text) if text else None
        except ValueError:
            continue
        if isinstance(described, dict) and ("format" in described or described.get("legacy")):
            return described
    return None


def _read_relabels(run, recorded: dict, chunk_rows: int) -> tuple[dict[str, int], str] | None:
    """A repaired version's label edits and their digest (None when the run has none)."""
    if RELABELS not in recorded:
        return None
    dataset = recorded[RELABELS].dataset
    described = _description(run, RELABELS, dataset)
    if described is None:
        raise LineageError(f"Run {run.info.run_id} records label edits without saying where they are; {REFUSAL}.")
    parts, digest = _scan(run.info.run_id, "label-edit", described, dataset.digest, chunk_rows,
                          lambda frame: dict(zip(frame["example_id"], frame["label"].astype(int), strict=True)))
    return {k: int(v) for part in parts for k, v in part.items()}, digest


def _scan(run_id: str, what: str, described: dict | None, recorded: str, chunk_rows: int, encode) -> tuple[list, str]:
    """Every chunk of the data `described` through `encode`, with its digest checked against
    `recorded`; returns the encoded chunks and the digest. A chunk that cannot be encoded stops
    the encoding but not the digest, so changed data is reported as changed."""
    if described is None or described.get("legacy"):
        return _scan_legacy(run_id, what, described, recorded, encode)
    try:
        source = DataSource.from_dict(described)
    except InvalidInput as exc:
        raise LineageError(f"Run {run_id} records an unusable source for its {what} data ({_clause(exc)}).") from exc
    digest, parts, failure, where = ContentDigest(), [], None, source.uri
    try:
        with _readable(source, described) as readable:
            where = readable.uri
            for frame in iter_frames(readable, chunk_rows, digest):
                if failure is None:
                    try:
                        parts.append(encode(frame))
                    except AuditError as exc:
                        failure, parts = exc, []
    except SourceMissing as exc:
        raise LineageError(f"The {what} data of run {run_id} is gone: nothing is at {where} any more; "
                           f"{REFUSAL}.") from exc
    except AuditError as exc:
        raise LineageError(f"The {what} data of run {run_id} at {where} cannot be read ({_clause(exc)}); "
                           f"{REFUSAL}.") from exc
    found = digest.hexdigest()
    if found != recorded:
        raise LineageError(f"The {what} data of run {run_id} at {where} has digest {found} but {recorded} was "
                           "recorded at training time; refusing to audit against data the model was not trained on.")
    if failure is not None:
        raise LineageError(f"The {what} data of run {run_id} matches its digest but cannot be encoded for this "
                           f"model ({_clause(failure)}).") from failure
    return parts, found


@contextmanager
def _readable(source: DataSource, described: dict) -> Iterator[DataSource]:
    """`source` as it can be read here: a copy in a run's artifacts is read in place from a local
    artifact store (where the run's artifacts are now, so a relocated store works), else
    downloaded to a temporary folder; a reference as recorded. SourceMissing when it is gone."""
    if "artifact_path" not in described:
        yield source
        return
    try:
        owner = MlflowClient().get_run(described["run_id"])
    except (KeyError, mlflow.exceptions.MlflowException) as exc:
        raise SourceMissing(f"No run {described.get('run_id')} holds the data any more.") from exc
    uri = f"{owner.info.artifact_uri.rstrip('/')}/{described['artifact_path']}"
    if urlparse(uri).scheme in ("", "file"):
        yield replace(source, uri=uri)
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except Exception as exc:  # noqa: BLE001 - any artifact-store failure means the copy cannot be had
            raise SourceMissing(f"No data at {uri}.") from exc
        yield replace(source, uri=local)


def _scan_legacy(run_id: str, what: str, described: dict | None, recorded: str, encode) -> tuple[list, str]:
    """A split logged before this layout: the whole `data/<split>.parquet` artifact of its run,
    digested with `audit.examples.content_digest`."""
    owner = (described or {}).get("run_id", run_id)
    artifact_path = (described or {}).get("artifact_path", f"data/{what}.parquet")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=owner, artifact_path=artifact_path, dst_path=tmp)
        except Exception as exc:  # noqa: BLE001 - any artifact-store failure means the copy cannot be had
            raise LineageError(f"Run {owner} has no artifact {artifact_path} to recover its {what} data from.") from exc
        frame = pd.read_parquet(local)
    found = content_digest(frame)
    if found != recorded:
        raise LineageError(f"The {what} data of run {run_id} has digest {found} but {recorded} was recorded at "
                           "training time; refusing to audit against data the model was not trained on.")
    try:
        return [encode(frame)], found
    except AuditError as exc:
        raise LineageError(f"The {what} data of run {run_id} matches its digest but cannot be encoded for this "
                           f"model ({_clause(exc)}).") from exc


def _concatenated(parts: list[ExampleTable]) -> ExampleTable:
    """One table from the encoded chunks, in order (inputs of every chunk share one shape)."""
    if not parts:
        raise LineageError("The training data holds no examples.")
    if len(parts) == 1:
        return parts[0]
    displays = [part.display for part in parts]
    display = None if any(d is None for d in displays) else tuple(text for d in displays for text in d)
    return ExampleTable(tuple(i for part in parts for i in part.ids), torch.cat([part.inputs for part in parts]),
                        torch.cat([part.labels for part in parts]), display)


def _clause(exc: Exception) -> str:
    """An error's sentence as a clause inside another one."""
    return str(exc).strip().rstrip(".")


NOISE_ARTIFACT = "data/label_noise.parquet"


def log_label_noise(train_ids: tuple[str, ...], clean_labels, noisy_labels) -> None:
    """Demo only: log which training labels were flipped (`example_id`, `clean_label`,
    `noisy_label`), the ground truth for relabel precision. Real users have no such file."""
    frame = pd.DataFrame({"example_id": list(train_ids), "clean_label": list(map(int, clean_labels)),
                          "noisy_label": list(map(int, noisy_labels))})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(NOISE_ARTIFACT).name
        frame.to_parquet(path, index=False)
        mlflow.log_artifact(str(path), artifact_path="data")
