"""Training-data lineage on a real MLflow sqlite store."""

import json
import shutil
import uuid
from pathlib import Path

import fsspec
import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from audit.datasets import DataSource, frame_digest, summarize
from audit.errors import InvalidInput, LineageError
from audit.examples import ExampleTable, content_digest, pixel_frame
from registry_hooks.lineage import (
    log_derived_training_data,
    log_training_data,
    log_training_reference,
    recover_training_data,
)
from registry_hooks.model_io import ModelSpec

SPEC = ModelSpec((1, 8, 8), 10)


def _table(prefix, n, seed):
    g = torch.Generator().manual_seed(seed)
    return ExampleTable(tuple(f"{prefix}-{i}" for i in range(n)), torch.rand(n, 1, 8, 8, generator=g) * 16,
                        torch.randint(0, 10, (n,), generator=g))


def _logged_run():
    train, validation = _table("t", 12, 0), _table("v", 5, 1)
    with mlflow.start_run() as run:
        digests = log_training_data(train, validation)
    return run.info.run_id, train, validation, digests


def test_recovered_data_matches_what_was_logged(mlflow_store):
    run_id, train, validation, digests = _logged_run()
    recovered = recover_training_data(run_id, SPEC)
    assert recovered.train.ids == train.ids and recovered.validation.ids == validation.ids
    assert torch.equal(recovered.train.labels, train.labels)
    assert torch.allclose(recovered.train.inputs, train.inputs)
    assert recovered.digests == digests
    recorded = {d.dataset.name: d.dataset.digest for d in mlflow.get_run(run_id).inputs.dataset_inputs}
    assert recorded == digests


def test_a_tampered_training_file_is_refused(mlflow_store):
    run_id, *_ = _logged_run()
    path = Path(mlflow.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "data" / "train.parquet"
    frame = pd.read_parquet(path)
    frame.at[3, "pixels"] = [0.0] * 64  # a silent edit of one image: labels and ids unchanged
    frame.to_parquet(path, index=False)
    with pytest.raises(LineageError, match="refusing to audit"):
        recover_training_data(run_id, SPEC)


def test_a_run_without_data_inputs_has_no_lineage(mlflow_store):
    with mlflow.start_run() as run:
        pass
    with pytest.raises(LineageError, match="records no `train` dataset input"):
        recover_training_data(run.info.run_id, SPEC)


# -- training data by reference (log_training_reference), repairs (log_derived_training_data) ------

REFUSED = "refusing to audit without the data the model was trained on"


def _frame(prefix, n, seed):
    return pixel_frame(_table(prefix, n, seed))


def _referenced(tmp_path, train=None, validation=None, **kwargs):
    """A run recording a train folder (two Parquet files) and a validation file by reference."""
    train = _frame("t", 12, 0) if train is None else train
    validation = _frame("v", 5, 1) if validation is None else validation
    folder = tmp_path / "data" / "train"
    folder.mkdir(parents=True)
    train.iloc[:7].to_parquet(folder / "part-0.parquet", index=False)
    train.iloc[7:].to_parquet(folder / "part-1.parquet", index=False)
    validation.to_parquet(tmp_path / "data" / "validation.parquet", index=False)
    with mlflow.start_run() as run:
        digests = log_training_reference(folder, tmp_path / "data" / "validation.parquet", **kwargs)
    return run.info.run_id, folder, digests


def _inputs(run_id):
    return {d.dataset.name: d for d in MlflowClient().get_run(run_id).inputs.dataset_inputs}


def test_data_recorded_by_reference_is_read_from_its_source_without_a_copy(mlflow_store, tmp_path):
    train, validation = _table("t", 12, 0), _table("v", 5, 1)
    run_id, folder, digests = _referenced(tmp_path)
    recorded = _inputs(run_id)
    assert {name: d.dataset.digest for name, d in recorded.items()} == digests
    source = json.loads(recorded["train"].dataset.source)
    assert (source["uri"], source["format"], recorded["train"].dataset.source_type) == (str(folder), "parquet", "local")
    assert [c["name"] for c in json.loads(recorded["train"].dataset.schema)["mlflow_colspec"]] == [
        "example_id", "label", "pixels"]
    assert json.loads(recorded["validation"].dataset.profile) == {"num_rows": 5}
    assert {t.key: t.value for t in recorded["validation"].tags}["mlflow.data.context"] == "validation"
    assert MlflowClient().list_artifacts(run_id) == []  # nothing copied
    recovered = recover_training_data(run_id, SPEC)
    assert recovered.train.ids == train.ids and recovered.validation.ids == validation.ids
    assert torch.equal(recovered.train.labels, train.labels) and torch.allclose(recovered.train.inputs, train.inputs)
    assert recovered.digests == digests and recovered.relabels == {}
    chunked = recover_training_data(run_id, SPEC, chunk_rows=5)
    assert chunked.train.ids == recovered.train.ids and torch.equal(chunked.train.inputs, recovered.train.inputs)
    assert chunked.digests == digests


def test_a_changed_source_is_refused_naming_the_split_and_both_digests(mlflow_store, tmp_path):
    run_id, _, digests = _referenced(tmp_path)
    path = tmp_path / "data" / "validation.parquet"
    frame = pd.read_parquet(path)
    frame.loc[2, "label"] = (frame.loc[2, "label"] + 1) % 10  # one label edited, nothing else
    frame.to_parquet(path, index=False)
    found = summarize(DataSource(str(path))).digest
    with pytest.raises(LineageError) as refused:
        recover_training_data(run_id, SPEC)
    assert str(refused.value) == (
        f"The validation data of run {run_id} at {path} has digest {found} but {digests['validation']} was "
        "recorded at training time; refusing to audit against data the model was not trained on.")


def test_a_deleted_source_is_refused_in_one_sentence(mlflow_store, tmp_path):
    run_id, folder, _ = _referenced(tmp_path)
    shutil.rmtree(folder)
    with pytest.raises(LineageError) as refused:
        recover_training_data(run_id, SPEC)
    assert str(refused.value) == f"The train data of run {run_id} is gone: nothing is at {folder} any more; {REFUSED}."


def test_bad_references_are_refused_before_anything_is_logged(mlflow_store, tmp_path):
    _frame("t", 4, 0).to_parquet(tmp_path / "t.parquet", index=False)
    with mlflow.start_run() as run:
        with pytest.raises(InvalidInput, match="has no column `text`"):
            log_training_reference(tmp_path / "t.parquet", tmp_path / "t.parquet", inputs=["text"])
        with pytest.raises(LineageError, match=r"^No data at .*missing\.parquet\.$"):
            log_training_reference(tmp_path / "t.parquet", tmp_path / "missing.parquet")
    logged = MlflowClient().get_run(run.info.run_id)
    assert logged.inputs.dataset_inputs == [] and not any(k.startswith("audit.data.") for k in logged.data.tags)
    with pytest.raises(InvalidInput, match="needs an active MLflow run"):
        log_training_reference(tmp_path / "t.parquet", tmp_path / "t.parquet")


def test_an_fsspec_url_and_renamed_columns_are_recorded_and_read_back_the_same_way(mlflow_store):
    memory = fsspec.filesystem("memory")
    base = f"/lineage-{uuid.uuid4().hex}"
    renames = {"id": "example_id", "y": "label", "flat": "pixels"}
    try:
        for split, frame in (("train", _frame("t", 9, 0)), ("validation", _frame("v", 4, 1))):
            with memory.open(f"{base}/{split}.parquet", "wb") as handle:
                frame.rename(columns={v: k for k, v in renames.items()}).to_parquet(handle, index=False)
        with mlflow.start_run() as run:
            digests = log_training_reference(f"memory://{base}/train.parquet", f"memory://{base}/validation.parquet",
                                             columns=renames)
        source = json.loads(_inputs(run.info.run_id)["train"].dataset.source)
        assert (source["uri"], source["columns"]) == (f"memory://{base}/train.parquet", renames)
        recovered = recover_training_data(run.info.run_id, SPEC, chunk_rows=4)
        assert recovered.train.ids == _table("t", 9, 0).ids and recovered.digests == digests
        assert digests["train"] == frame_digest(_frame("t", 9, 0))  # the digest of the renamed rows
    finally:
        memory.rm(base, recursive=True)


def test_a_hugging_face_dataset_saved_to_disk_is_read_without_the_datasets_library(mlflow_store, tmp_path):
    datasets = pytest.importorskip("datasets")
    for split, frame in (("train", _frame("t", 10, 0)), ("validation", _frame("v", 4, 1))):
        datasets.Dataset.from_pandas(frame.rename(columns={"example_id": "uid"}), preserve_index=False).save_to_disk(
            str(tmp_path / "hf" / split), num_shards=2)
    with mlflow.start_run() as run:
        digests = log_training_reference(tmp_path / "hf" / "train", tmp_path / "hf" / "validation",
                                         format="huggingface", columns={"uid": "example_id"})
    recovered = recover_training_data(run.info.run_id, SPEC, chunk_rows=3)
    assert recovered.train.ids == _table("t", 10, 0).ids
    assert torch.allclose(recovered.train.inputs, _table("t", 10, 0).inputs)
    assert digests["train"] == frame_digest(_frame("t", 10, 0))


def test_an_image_folder_is_recorded_and_encoded_with_the_model_s_image_modality(mlflow_store, tmp_path):
    from PIL import Image as PILImage

    from audit.modalities import Image

    for split, count in (("train", 3), ("validation", 1)):
        for cls, shade in (("cat", 40), ("dog", 200)):
            (tmp_path / split / cls).mkdir(parents=True)
            for n in range(count):
                PILImage.new("L", (6, 6), color=shade + n).save(tmp_path / split / cls / f"{n}.png")
    modality = Image((4, 4), "L", (0.5,), (0.25,))
    spec = ModelSpec((1, 4, 4), 2, modality=modality)
    with mlflow.start_run() as run:
        log_training_reference(tmp_path / "train", tmp_path / "validation", format="imagefolder")
    recovered = recover_training_data(run.info.run_id, spec, chunk_rows=2)
    assert recovered.train.ids == ("cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png", "dog/2.png")
    assert recovered.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert recovered.train.inputs.shape == (6, 1, 4, 4)
    expected = modality.encode((tmp_path / "train" / "dog" / "1.png").read_bytes())
    assert torch.equal(recovered.train.inputs[4], expected)


def test_runs_with_the_same_data_at_different_places_each_read_their_own(mlflow_store, tmp_path):
    """MLflow keeps one dataset record per digest (the first run's source): the run tag decides."""
    first, first_folder, digests = _referenced(tmp_path / "first")
    second, _, again = _referenced(tmp_path / "second")
    assert again == digests
    shutil.rmtree(first_folder)
    assert recover_training_data(second, SPEC).digests == digests
    with pytest.raises(LineageError, match=f"The train data of run {first} is gone"):
        recover_training_data(first, SPEC)


def test_a_repair_records_its_label_edits_and_a_repair_of_it_composes_them(mlflow_store, tmp_path):
    v1, _, digests = _referenced(tmp_path)
    with mlflow.start_run() as run:
        v2_digests = log_derived_training_data(v1, {"t-0": 9, "t-3": 1})
    v2 = run.info.run_id
    assert {k: v2_digests[k] for k in ("train", "validation")} == digests and "relabels" in v2_digests
    assert [a.path for a in MlflowClient().list_artifacts(v2, "data")] == ["data/relabels.parquet"]
    tags = {run_id: MlflowClient().get_run(run_id).data.tags for run_id in (v1, v2)}
    assert tags[v2]["audit.data.train"] == tags[v1]["audit.data.train"]  # the same source, re-recorded
    with mlflow.start_run() as run:
        log_derived_training_data(v2, {"t-3": 2, "t-5": 4})
    v3 = run.info.run_id

    original = recover_training_data(v1, SPEC).train
    repaired = recover_training_data(v2, SPEC)
    assert repaired.relabels == {"t-0": 9, "t-3": 1} and repaired.digests == v2_digests
    assert torch.equal(repaired.train.labels, original.relabelled({"t-0": 9, "t-3": 1}).labels)
    assert torch.equal(repaired.train.inputs, original.inputs)
    chained = recover_training_data(v3, SPEC)
    assert chained.relabels == {"t-0": 9, "t-3": 2, "t-5": 4}
    assert torch.equal(chained.train.labels, original.relabelled(chained.relabels).labels)
    assert torch.equal(chained.validation.labels, recover_training_data(v1, SPEC).validation.labels)


def test_edited_label_edits_are_refused(mlflow_store, tmp_path):
    v1, _, _ = _referenced(tmp_path)
    with mlflow.start_run() as run:
        log_derived_training_data(v1, {"t-0": 9})
    artifacts = Path(MlflowClient().get_run(run.info.run_id).info.artifact_uri.removeprefix("file://"))
    path = artifacts / "data" / "relabels.parquet"
    pd.DataFrame({"example_id": ["t-0"], "label": [8]}).to_parquet(path, index=False)
    with pytest.raises(LineageError, match=f"^The label-edit data of run {run.info.run_id} at .* has digest"):
        recover_training_data(run.info.run_id, SPEC)
    with mlflow.start_run(), pytest.raises(InvalidInput, match="must map a string id to a class index"):
        log_derived_training_data(v1, {"t-0": "cat"})


def test_a_copied_frame_with_any_input_columns_records_its_digest_and_schema(mlflow_store):
    train = pd.DataFrame({"example_id": ["a", "b", "c"], "label": [0, 1, 0], "text": ["good", "bad", "fine"]})
    with mlflow.start_run() as run:
        digests = log_training_data(train, train.iloc[:2])
    recorded = _inputs(run.info.run_id)
    assert digests["train"] == frame_digest(train) == recorded["train"].dataset.digest
    assert [c["name"] for c in json.loads(recorded["train"].dataset.schema)["mlflow_colspec"]] == [
        "example_id", "label", "text"]
    assert sorted(a.path for a in MlflowClient().list_artifacts(run.info.run_id, "data")) == [
        "data/train.parquet", "data/validation.parquet"]


def test_a_run_logged_before_references_is_still_read_and_can_be_repaired(mlflow_store, tmp_path):
    """The layout before this change: a pandas dataset input digested with content_digest."""
    train, validation = _table("t", 6, 0), _table("v", 3, 1)
    with mlflow.start_run() as run:
        for split, table in (("train", train), ("validation", validation)):
            frame = pixel_frame(table)
            frame.to_parquet(tmp_path / f"{split}.parquet", index=False)
            mlflow.log_artifact(str(tmp_path / f"{split}.parquet"), artifact_path="data")
            source = f"{mlflow.get_artifact_uri('data')}/{split}.parquet"
            dataset = mlflow.data.from_pandas(frame, source=source, targets="label", name=split,
                                              digest=content_digest(frame))
            mlflow.log_input(dataset, context="training" if split == "train" else "validation")
    legacy = run.info.run_id
    assert torch.equal(recover_training_data(legacy, SPEC).train.labels, train.labels)
    with mlflow.start_run() as run:
        log_derived_training_data(legacy, {"t-1": 7})
    repaired = recover_training_data(run.info.run_id, SPEC)
    assert torch.equal(repaired.train.labels, train.relabelled({"t-1": 7}).labels)


def test_a_repair_of_a_version_with_copied_data_reads_the_source_run_s_copy(mlflow_store):
    run_id, train, _, digests = _logged_run()
    with mlflow.start_run() as run:
        log_derived_training_data(run_id, {"t-2": 5})
    assert [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "data")] == ["data/relabels.parquet"]
    repaired = recover_training_data(run.info.run_id, SPEC)
    assert torch.equal(repaired.train.labels, train.relabelled({"t-2": 5}).labels)
    assert {k: repaired.digests[k] for k in ("train", "validation")} == digests
