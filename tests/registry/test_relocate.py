"""A copied workdir is self-contained once relocated: its store points at its own artifacts, so the
original can be deleted; until then, commands refuse it instead of writing into the original."""

import shutil

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from audit.demo.models import SmallResNet
from audit.errors import AuditError
from registry_hooks.model_io import ModelSpec, load_version, log_classifier, resolve_version
from registry_hooks.registry import register_version
from registry_hooks.store import StoreMoved, relocate, tracking_uri, use_store


def _populate(workdir):
    """A run with a small artifact, a dataset input from a file in the workdir, and a registered
    model version (@champion): every kind of location the store records."""
    torch.manual_seed(0)
    model = SmallResNet()
    frame = pd.DataFrame({"x": [1.0, 2.0]})
    frame.to_parquet(workdir / "train.parquet")
    with mlflow.start_run() as run:
        mlflow.log_text("evidence", "audit/note.txt")
        mlflow.log_input(mlflow.data.from_pandas(frame, source=str(workdir / "train.parquet")), context="training")
        uri = log_classifier(model, ModelSpec((1, 8, 8), 10))
    return model, run.info.run_id, register_version(uri, "m", "champion")


def test_a_relocated_copy_works_after_the_original_is_deleted(mlflow_store, tmp_path):
    model, run_id, version = _populate(mlflow_store)
    copy = tmp_path / "copied-workdir"
    shutil.copytree(mlflow_store, copy)

    with pytest.raises(StoreMoved, match=f"keeps its artifacts in {mlflow_store / 'mlruns'}.*model-audit relocate"):
        use_store(copy)
    moved = relocate(copy)
    assert moved.moved_from == mlflow_store.resolve()
    assert moved.rewritten["experiments.artifact_location"] == 1 and moved.rewritten["runs.artifact_uri"] == 1
    assert moved.rewritten["model_versions.storage_location"] == 1
    assert moved.rewritten["datasets.dataset_source"] == 1
    again = relocate(copy)
    assert (again.moved_from, again.total) == (None, 0)  # idempotent

    shutil.rmtree(mlflow_store)
    use_store(copy)
    client = MlflowClient()
    assert client.get_run(run_id).info.artifact_uri.startswith((copy / "mlruns").as_uri())
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/audit/note.txt") == "evidence"
    (dataset,) = client.get_run(run_id).inputs.dataset_inputs
    assert str(copy) in dataset.dataset.source
    # the model loads, its digest checked, from the copy's files
    loaded = load_version(resolve_version("m", alias="champion"), allow_pickle=True).model
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)
    # and new runs write into the copy
    with mlflow.start_run() as run:
        mlflow.log_text("new", "n.txt")
    assert (copy / "mlruns").as_uri() in run.info.artifact_uri
    assert list(copy.rglob("n.txt"))


def test_relocate_refuses_a_folder_without_a_store(tmp_path):
    with pytest.raises(AuditError, match="holds no MLflow store"):
        relocate(tmp_path)


def test_relocate_leaves_a_store_in_place_and_other_locations_alone(mlflow_store):
    _populate(mlflow_store)
    assert relocate(mlflow_store).total == 0
    client = MlflowClient(tracking_uri(mlflow_store))
    elsewhere = client.create_experiment("remote", artifact_location="s3://bucket/artifacts")
    assert client.get_experiment(elsewhere).artifact_location == "s3://bucket/artifacts"
    assert relocate(mlflow_store).total == 0


def test_training_data_referenced_inside_the_workdir_follows_the_copy(mlflow_store, tmp_path):
    from registry_hooks.lineage import log_training_reference, recover_training_data

    data = mlflow_store / "data"
    data.mkdir()
    frame = pd.DataFrame({"example_id": ["a", "b"], "pixels": [[0.0] * 64, [1.0] * 64], "label": [0, 1]})
    frame.to_parquet(data / "train.parquet")
    frame.to_parquet(data / "validation.parquet")
    with mlflow.start_run() as run:
        log_training_reference(data / "train.parquet", data / "validation.parquet")
    copy = tmp_path / "copied-workdir"
    shutil.copytree(mlflow_store, copy)
    assert relocate(copy).rewritten["tags.audit.data"] == 2

    shutil.rmtree(mlflow_store)
    use_store(copy)
    recovered = recover_training_data(run.info.run_id, ModelSpec((1, 8, 8), 2))
    assert recovered.train.ids == ("a", "b") and recovered.validation.labels.tolist() == [0, 1]
