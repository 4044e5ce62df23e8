"""Training-data lineage: the data a model was trained on, logged with the model's run and
recovered (digest-checked) by audits.

Layout of a model's run: artifacts `data/train.parquet` and `data/validation.parquet`
(`example_id`, `pixels`, `label`) and MLflow dataset inputs `train` / `validation` whose digest
is `audit.examples.content_digest` of that Parquet content.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from audit.errors import LineageError
from audit.examples import ExampleTable, content_digest, pixel_frame, table_from_pixel_frame

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class TrainingData:
    """The splits a model version was trained and validated on, with their digests."""

    train: ExampleTable
    validation: ExampleTable
    digests: dict[str, str]


def log_training_data(train: ExampleTable, validation: ExampleTable) -> dict[str, str]:
    """Log both splits into the active run as Parquet artifacts and dataset inputs; returns digests."""
    digests = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split, table in zip(SPLITS, (train, validation), strict=True):
            frame = pixel_frame(table)
            path = Path(tmp) / f"{split}.parquet"
            frame.to_parquet(path, index=False)
            mlflow.log_artifact(str(path), artifact_path="data")
            digest = content_digest(frame)
            source = f"{mlflow.get_artifact_uri('data')}/{split}.parquet"
            with warnings.catch_warnings():
                # MLflow hints about integer label columns and ambiguous local sources: both expected here.
                warnings.simplefilter("ignore", UserWarning)
                dataset = mlflow.data.from_pandas(frame, source=source, targets="label", name=split, digest=digest)
                mlflow.log_input(dataset, context="training" if split == "train" else "validation")
            digests[split] = digest
    return digests


def recover_training_data(run_id: str, input_shape: tuple[int, ...]) -> TrainingData:
    """Download a run's training and validation splits and check them against the dataset digests
    recorded at training time. Raises `LineageError` on a missing split or a digest mismatch."""
    run = MlflowClient().get_run(run_id)
    recorded = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    tables, digests = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for split in SPLITS:
            if split not in recorded:
                raise LineageError(f"Run {run_id} records no `{split}` dataset input; "
                                   "cannot recover its training data.")
            try:
                local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"data/{split}.parquet",
                                                            dst_path=tmp)
            except Exception as exc:
                raise LineageError(f"Run {run_id} has no artifact data/{split}.parquet "
                                   f"to recover its {split} data from.") from exc
            frame = pd.read_parquet(local)
            found = content_digest(frame)
            if found != recorded[split]:
                raise LineageError(
                    f"The {split} data of run {run_id} has digest {found} but {recorded[split]} was recorded at "
                    "training time; refusing to audit against data the model was not trained on."
                )
            tables[split] = table_from_pixel_frame(frame, input_shape)
            digests[split] = found
    return TrainingData(tables["train"], tables["validation"], digests)


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
