"""A model of the image modality, its training data an image folder recorded by reference, audited
from a flagged batch of `image_path` cells relative to `--image-root`; the correction reads the
audited batch back from the run, so the logged batch holds the pictures themselves."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch


def _png(value: int) -> bytes:
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.fromarray(np.full((6, 6), value, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _image_folder(root: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for label, (low, high) in enumerate(((0, 100), (150, 255))):  # class 0 dark, class 1 bright
        (root / str(label)).mkdir(parents=True)
        for i in range(per_class):
            (root / str(label) / f"{i}.png").write_bytes(_png(int(rng.integers(low, high))))


@pytest.fixture
def image_champion(mlflow_store, tmp_path):
    import mlflow

    from audit.modalities import Image
    from registry_hooks.lineage import log_training_reference
    from registry_hooks.model_io import ModelSpec, log_classifier
    from registry_hooks.registry import register_version

    _image_folder(tmp_path / "train", 12, 0)
    _image_folder(tmp_path / "validation", 6, 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    spec = ModelSpec((1, 4, 4), 2, modality=Image((4, 4), "L", (0.5,), (0.5,)))
    with mlflow.start_run():
        log_training_reference(tmp_path / "train", tmp_path / "validation", format="imagefolder")
        uri = log_classifier(model, spec)
    register_version(uri, "pics", "champion")
    production = tmp_path / "production"
    production.mkdir()
    names = []
    for i, value in enumerate((10, 40, 200, 230)):
        (production / f"p{i}.png").write_bytes(_png(value))
        names.append(f"p{i}.png")
    with torch.no_grad():
        x = torch.stack([spec.modality.encode((production / n).read_bytes()) for n in names])
        predicted = model(x).argmax(1).numpy()
    frame = pd.DataFrame({"example_id": names, "image_path": names, "predicted_label": predicted,
                          "true_label": 1 - predicted})  # every row flagged as a misprediction
    return mlflow_store, production, frame


def test_image_paths_under_the_image_root_are_audited_and_logged_as_pictures(prefect_harness, image_champion):
    from flows.audit_flow import audit
    from flows.correct_flow import load_audit
    from flows.settings import AuditSettings, StoreSettings
    from registry_hooks import audit_log

    workdir, production, frame = image_champion
    (workdir / "inbox").mkdir()
    frame.to_parquet(workdir / "inbox" / "batch.parquet", index=False)
    store = StoreSettings(workdir=workdir, allow_pickle=True)
    result = audit(store, AuditSettings(model_name="pics", image_root=production))
    assert (result.n_flagged, result.n_train) == (4, 24)

    logged = audit_log.load_table(result.run_id, "flagged")
    assert "image_path" not in logged.columns
    assert [bytes(b) for b in logged["image"]] == [(production / n).read_bytes() for n in frame["image_path"]]
    inputs = load_audit.fn(result.run_id, True)  # what the correction reads back, without the image root
    assert inputs.flagged.inputs.shape == (4, 1, 4, 4)
    assert inputs.flagged.ids == tuple(frame["example_id"])


def test_image_paths_without_a_root_or_outside_it_quarantine_the_batch(prefect_harness, image_champion):
    from audit.errors import InvalidFlaggedBatch
    from flows.audit_flow import audit
    from flows.settings import AuditSettings, StoreSettings

    workdir, production, frame = image_champion
    store = StoreSettings(workdir=workdir, allow_pickle=True)
    for batch, root, says in ((frame, None, "none given"),
                              (frame.assign(image_path=["../p0.png"] * 4), production, "under the image root")):
        (workdir / "inbox").mkdir(exist_ok=True)
        batch.to_parquet(workdir / "inbox" / "batch.parquet", index=False)
        with pytest.raises(InvalidFlaggedBatch, match=says):
            audit(store, AuditSettings(model_name="pics", image_root=root))
        assert not list((workdir / "inbox").glob("*.parquet"))  # moved to quarantine
