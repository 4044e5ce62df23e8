"""The image demo end to end, at a small scale (flows.demo_images): digits written as PNG files in
an ImageFolder layout, a torchvision model of kind `torchvision` trained on them as the `image`
modality reads them, its data recorded by reference, and the same `audit` and `correct` flows
(Prefect ephemeral server, MLflow sqlite store, Great Expectations, onnxruntime).

Only what holds by construction is asserted, never how one training run went: the gates may pass
or fail, and either outcome must be recorded and explained."""

import base64
import io
import json
import re

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from flows.demo_images import MODEL_NAME, TUNED_PARAMS, run_image_demo, summary
from registry_hooks.store import use_store

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("image-demo")]

IMAGE_SIZE = 16
BUILDER = "resnet18"
SCALE = {"image_size": IMAGE_SIZE, "epochs": 2, "builder": BUILDER, "candidates": ("relabel",)}


@pytest.fixture(scope="module")
def image_demo(prefect_harness, tmp_path_factory):
    return run_image_demo(tmp_path_factory.mktemp("image-demo") / "workdir", **SCALE)


@pytest.fixture
def result(image_demo):
    use_store(image_demo.workdir)  # other tests move the store
    return image_demo


def _thumbnails(html: str, section: str) -> list:
    """The pictures (PIL images) of one report section."""
    from PIL import Image

    start = html.index(f'id="{section}"')
    end = html.find("</section>", start)
    found = re.findall(r'<img class="thumb" alt="[^"]*" src="data:image/png;base64,([^"]+)"', html[start:end])
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in found]


def test_the_champion_is_a_torchvision_image_model_with_its_image_folders_by_reference(result):
    client = MlflowClient()
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == result.champion_version
    run = client.get_run(champion.run_id)
    params = run.data.params
    assert params["model_kind"] == "torchvision" and params["torchvision_builder"] == BUILDER
    assert json.loads(params["torchvision_kwargs"]) == {"num_classes": 10}
    assert params["modality"] == "image" and params["image_size"] == f"{IMAGE_SIZE}x{IMAGE_SIZE}"
    assert params["image_mode"] == "RGB" and params["input_shape"] == f"3x{IMAGE_SIZE}x{IMAGE_SIZE}"
    assert json.loads(params["tuned_params"]) == list(TUNED_PARAMS)
    # by reference: each split's dataset input points at its image folder, nothing copied into the run
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    for split in ("train", "validation"):
        source = json.loads(inputs[split].source)
        assert source["format"] == "imagefolder" and source["uri"] == str(result.data_roots[split])
        assert "artifact_path" not in source
    assert json.loads(inputs["train"].profile)["num_rows"] == result.n_train
    data_files = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert not data_files & {"data/train.parquet", "data/validation.parquet"}
    assert data_files <= {"data/label_noise.parquet"}  # the demo's ground truth, not training data
    # the folders hold one PNG per example, under the class folder of its (noisy) training label
    pictures = sorted(p for p in result.data_roots["train"].rglob("*.png"))
    assert len(pictures) == result.n_train and {p.parent.name for p in pictures} == set(map(str, range(10)))
    # loads back without unpickling, as the same kind
    from registry_hooks.model_io import load_version, resolve_version

    loaded = load_version(resolve_version(MODEL_NAME, version=result.champion_version), allow_pickle=False)
    assert loaded.spec.kind.name == "torchvision" and loaded.spec.modality.name == "image"
    assert {n for n, p in loaded.model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}


def test_the_audit_shows_the_flagged_and_training_pictures(result):
    client = MlflowClient()
    audit_run = result.audit.run_id
    assert result.audit.n_flagged == result.n_flagged > 0 and result.audit.n_train == result.n_train
    flagged = mlflow.artifacts.load_text(f"runs:/{audit_run}/audit/flagged_validation.json")
    assert json.loads(flagged)["success"] is True
    files = {a.path for a in client.list_artifacts(audit_run, "audit")}
    assert {"audit/report.html", "audit/suspects.json", "audit/influence_grid.png", "audit/flagged.parquet"} <= files
    html = mlflow.artifacts.load_text(f"runs:/{audit_run}/audit/report.html")
    # every flagged row: its own picture plus its most harmful and most helpful training pictures
    flagged_pictures = _thumbnails(html, "flagged")
    assert len(flagged_pictures) == result.n_flagged * (1 + 2 * 3)
    assert all(p.mode == "RGB" and p.size == (IMAGE_SIZE, IMAGE_SIZE) for p in flagged_pictures)
    train_ids = {str(p.relative_to(result.data_roots["train"])) for p in result.data_roots["train"].rglob("*.png")}
    captions = re.findall(r'<img class="thumb" alt="([^":]+): \d"', html)
    assert captions and set(captions) <= train_ids  # training pictures are captioned "<relative path>: <label>"
    # the MLflow table of suspects carries a picture per row when there are suspects
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{audit_run}/audit/suspects.json"))
    if table["data"]:
        column = table["columns"].index("picture")
        assert all(row[column]["type"] == "image" for row in table["data"])
        assert len(_thumbnails(html, "suspects")) == len(table["data"])
    ratio = client.get_run(audit_run).data.metrics["audit_epoch_ratio"]
    assert ratio == pytest.approx(result.audit_seconds / result.epoch_seconds)
    assert f"{result.epoch_seconds:.1f} s per training epoch" in summary(result)


def test_the_correction_gates_its_repair_and_registers_only_a_passing_torchvision_challenger(result):
    client = MlflowClient()
    correction = result.correction
    run = client.get_run(correction.run_id)
    registered = correction.registered_version is not None
    assert run.data.tags["audit.gates"] == ("passed" if registered else "failed")
    assert run.data.tags["audit.audit_run_id"] == result.audit.run_id
    text = summary(result)
    if not registered:
        reasons = correction.failure_reasons()
        assert reasons and "Not registered: " + "; ".join(reasons) in text
        assert {str(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'")} == {
            result.champion_version}
        return
    from registry_hooks.lineage import recover_training_data
    from registry_hooks.model_io import load_version, resolve_version

    assert f"registered version {correction.registered_version} as @challenger" in text
    challenger = client.get_model_version_by_alias(MODEL_NAME, "challenger")
    assert str(challenger.version) == correction.registered_version
    assert challenger.tags["audit.gates"] == "passed"
    assert challenger.tags["audit.source_version"] == result.champion_version
    assert run.data.metrics["fix_rate"] >= 0.5
    ref = resolve_version(MODEL_NAME, alias="challenger")
    loaded = load_version(ref, allow_pickle=False)  # the same kind, no pickle
    assert ref.spec.kind.name == "torchvision" and ref.spec.kind == resolve_version(
        MODEL_NAME, version=result.champion_version).spec.kind
    assert type(loaded.model) is type(ref.spec.kind.build())
    # lineage: the champion's image folders by reference, plus the repair's label edits
    repaired_run = client.get_run(ref.run_id)
    sources = {d.dataset.name: json.loads(d.dataset.source) for d in repaired_run.inputs.dataset_inputs}
    assert sources["train"]["uri"] == str(result.data_roots["train"])
    assert sources["train"]["format"] == "imagefolder"
    data = recover_training_data(ref.run_id, ref.spec)
    assert len(data.train) == result.n_train
    assert data.relabels == correction.search.chosen.repair.relabels
