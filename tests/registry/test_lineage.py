"""Training-data lineage on a real MLflow sqlite store."""

from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from audit.errors import LineageError
from audit.examples import ExampleTable
from registry_hooks.lineage import log_training_data, recover_training_data


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
    recovered = recover_training_data(run_id, (1, 8, 8))
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
        recover_training_data(run_id, (1, 8, 8))


def test_a_run_without_data_inputs_has_no_lineage(mlflow_store):
    with mlflow.start_run() as run:
        pass
    with pytest.raises(LineageError, match="records no `train` dataset input"):
        recover_training_data(run.info.run_id, (1, 8, 8))
