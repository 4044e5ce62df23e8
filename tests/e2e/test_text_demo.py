"""The text demo end to end (flows/demo_sst2.py) on what the tests build themselves: a tiny
random-init BERT (tests/text_helpers.tiny_bert) and a synthetic SST-2 folder
(audit.demo.sst2.tiny_sst2_sample), no ../shared and no download. Real Prefect, MLflow sqlite
store, Great Expectations and onnxruntime; nothing about one training trajectory is asserted."""

import html
import json

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from audit.demo.sst2 import tiny_sst2_sample
from registry_hooks import audit_log
from registry_hooks.tags import DATA_SOURCE
from tests.text_helpers import tiny_bert

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("text-demo")]

# Sentences a reviewer must see as written, markup and all. Each comes twice in dev.tsv, once
# capitalised, with opposite labels: the tokenizer lower-cases, so the model gives both the same
# token ids and the same prediction, and whenever both land in production one of them is a
# misprediction, flagged by construction.
MARKUP = ("it is <b>good</b> & fun", "the plot was <i>slow</i> & bad", "the film is <u>best</u> & great",
          "the story is <s>awful</s> & boring", "it was <b>funny</b> & fun", "the music is <b>bad</b> & slow")
N_TRAIN, N_DEV, N_TEST = 160, 40, 40
N_VALIDATION = 40
N_PRODUCTION = N_DEV + N_TEST + 2 * len(MARKUP) - N_VALIDATION  # every held-out sentence is used
MAX_LENGTH = 16


def _pairs() -> list[tuple[str, int]]:
    return [row for text in MARKUP for row in ((text, 1), (text[0].upper() + text[1:], 0))]


@pytest.fixture(scope="module")
def text_demo(prefect_harness, migrated_mlflow_db, tmp_path_factory):
    """The text demo with the tiny BERT, run once for this module. lr 3e-3 and 20 epochs of 5
    steps: the random-init model learns the templates, so few sentences are flagged."""
    import shutil

    from flows.demo_sst2 import run_sst2_demo

    data = tiny_sst2_sample(tmp_path_factory.mktemp("sst2"), n_train=N_TRAIN, n_dev=N_DEV, n_test=N_TEST)
    with (data / "dev.tsv").open("a", encoding="utf-8") as handle:
        handle.write("".join(f"{label}\t{text}\n" for text, label in _pairs()))
    workdir = tmp_path_factory.mktemp("text-demo") / "workdir"
    workdir.mkdir()
    shutil.copy(migrated_mlflow_db, workdir / "mlflow.db")
    return run_sst2_demo(workdir, data, n_train=N_TRAIN - 10, n_validation=N_VALIDATION, n_production=N_PRODUCTION,
                         noise_rate=0.1, seed=0, epochs=20, max_length=MAX_LENGTH, trainable_layers=2, lr=3e-3,
                         method="ekfac", model_factory=tiny_bert)


@pytest.fixture
def demo(text_demo):
    """The module's text demo, with MLflow pointed at its store (other tests move it)."""
    from registry_hooks.store import use_store

    use_store(text_demo.workdir)
    return text_demo


def test_the_sample_puts_a_markup_pair_in_production(demo):
    # The sampling is seeded numpy, the same everywhere: this holds the flagged-by-construction claim.
    production = set(pd.read_parquet(demo.data_folders["production"])["text"])
    assert any(text in production and text[0].upper() + text[1:] in production for text in MARKUP)
    assert demo.n_flagged >= 1


def test_the_champion_is_a_transformers_text_model_with_its_data_by_reference(demo):
    from flows.demo_sst2 import MODEL_NAME
    from registry_hooks.model_io import resolve_version

    ref = resolve_version(MODEL_NAME, alias="champion")
    assert ref.spec.kind.name == "transformers" and ref.spec.modality.name == "text"
    assert ref.spec.input_shape == (MAX_LENGTH,)
    assert ref.spec.tuned_params == ("model.bert.pooler.", "model.classifier.")
    run = MlflowClient().get_run(demo.train_run_id)
    assert run.data.params["model_kind"] == "transformers" and run.data.params["modality"] == "text"
    for split in ("train", "validation"):
        described = json.loads(run.data.tags[DATA_SOURCE.format(split=split)])
        assert described["uri"] == str(demo.data_folders[split]) and described["format"] == "parquet"
        assert "artifact_path" not in described  # a reference, not a copy
    inputs = {d.dataset.name: json.loads(d.dataset.source)["uri"] for d in run.inputs.dataset_inputs}
    assert inputs == {"train": str(demo.data_folders["train"]), "validation": str(demo.data_folders["validation"])}
    data_files = {a.path for a in MlflowClient().list_artifacts(demo.train_run_id, "data")}
    assert data_files == {"data/label_noise.parquet"}  # the demo's ground truth only: no split copied
    assert (demo.data_folders["train"] / "part-0.parquet").is_file()


def test_the_audit_report_shows_the_flagged_sentences_escaped_with_their_influences(demo):
    audit_run = demo.audit.run_id
    flagged = audit_log.load_table(audit_run, "flagged")
    assert "text" in flagged.columns and "pixels" not in flagged.columns
    assert len(flagged) == demo.n_flagged == demo.audit.n_flagged
    report = mlflow.artifacts.load_text(f"runs:/{audit_run}/audit/report.html")
    for text in flagged["text"]:
        assert html.escape(text, quote=False) in report
    markup = [t for t in flagged["text"] if "<" in t]
    assert markup  # one of each production pair is flagged (test_the_sample_puts_a_markup_pair_in_production)
    for text in markup:
        assert text not in report  # never as live markup
    influence = audit_log.load_table(audit_run, "influence")
    train_ids = set(pd.read_parquet(demo.data_folders["train"])["example_id"])
    assert set(influence["role"]) == {"helpful", "harmful"}
    assert set(influence["train_id"]) <= train_ids and set(influence["query_id"]) == set(flagged["example_id"])
    files = {a.path for a in MlflowClient().list_artifacts(audit_run, "audit")}
    assert {"audit/report.html", "audit/influence.parquet", "audit/self_influence.parquet",
            "audit/correction_candidates.parquet"} <= files
    assert "audit/influence_grid.png" not in files  # sentences are no pictures


def test_the_correction_runs_its_gates_and_registers_only_a_gated_transformers_challenger(demo):
    from flows.demo_sst2 import MODEL_NAME, summary
    from registry_hooks.lineage import RELABELS, recover_training_data
    from registry_hooks.model_io import load_version, resolve_version

    correction = demo.correction
    client = MlflowClient()
    run = client.get_run(correction.run_id)
    registered = correction.registered_version is not None
    assert run.data.tags["audit.gates"] == ("passed" if registered else "failed")
    text = summary(demo)
    assert "s per training epoch" in text and "for the audit" in text and demo.audit_seconds > 0
    if correction.gates is not None:
        gates = json.loads(mlflow.artifacts.load_text(f"runs:/{correction.run_id}/correction/gates.json"))
        assert gates["passed"] == correction.gates.passed == registered
    if not registered:
        assert correction.failure_reasons() and "Not registered: " in text
        assert {str(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'")} == {
            demo.champion_version}
        return
    challenger = client.get_model_version_by_alias(MODEL_NAME, "challenger")
    assert str(challenger.version) == correction.registered_version and challenger.tags["audit.gates"] == "passed"
    ref = resolve_version(MODEL_NAME, alias="challenger")
    assert ref.spec.kind.name == "transformers" and ref.spec.tuned_params == ("model.bert.pooler.",
                                                                              "model.classifier.")
    loaded = load_version(ref, allow_pickle=False)
    assert loaded.spec.kind.tokenizer is not None
    challenger_run = client.get_run(ref.run_id)
    for split in ("train", "validation"):  # the champion's data, by reference, unchanged
        described = json.loads(challenger_run.data.tags[DATA_SOURCE.format(split=split)])
        assert described["uri"] == str(demo.data_folders[split])
    relabels = demo.correction.search.chosen.repair.relabels
    assert (RELABELS in {d.dataset.name for d in challenger_run.inputs.dataset_inputs}) == bool(relabels)
    recovered = recover_training_data(ref.run_id, loaded.spec)
    labels = dict(zip(recovered.train.ids, recovered.train.labels.tolist(), strict=True))
    assert all(labels[i] == y for i, y in relabels.items())


def test_a_repair_of_the_head_is_gated_and_registered_as_the_whole_transformers_model(demo):
    """By construction (gates that any finite repair passes, as in tests/deploy/test_team.py): the
    correction repairs pooler + classifier on the frozen encoder's features (audit.frozen_features)
    and gates, exports and registers the whole model, every encoder weight the champion's."""
    import shutil

    import torch

    from audit.correction import CorrectionConfig, RepairCandidate
    from audit.text_classifier import TextClassifier
    from flows.audit_flow import audit
    from flows.correct_flow import correct
    from flows.demo_sst2 import MODEL_NAME
    from flows.settings import AuditSettings, CorrectionSettings, GateSettings, StoreSettings
    from registry_hooks.model_io import load_version, resolve_version

    workdir = demo.workdir
    for batch in (workdir / "processed" / demo.audit.run_id).iterdir():  # a fresh audit of the same batch
        shutil.copy(batch, workdir / "inbox" / batch.name)
    store = StoreSettings(workdir=workdir)
    audit_run_id = audit(store, AuditSettings(model_name=MODEL_NAME, method="graddot")).run_id
    permissive = GateSettings(min_fix_rate=0.0, max_accuracy_drop_points=100.0, max_class_recall_drop_points=100.0,
                              max_canary_flip_rate=1.0)
    step = RepairCandidate("head-steps", CorrectionConfig(lr=1e-3, steps=3, rounds=1))
    result = correct(store, CorrectionSettings(gates=permissive), audit_run_id, candidates=(step,))
    assert result.gates is not None and result.gates.passed, result.failure_reasons()
    repaired = result.search.chosen.repair.model
    assert isinstance(repaired, TextClassifier)  # the whole model, not the head it was repaired as
    assert [a.path for a in MlflowClient().list_artifacts(result.run_id, "onnx")] == ["onnx/model.onnx"]
    challenger = load_version(resolve_version(MODEL_NAME, version=result.registered_version), allow_pickle=False)
    champion = load_version(resolve_version(MODEL_NAME, version=demo.champion_version), allow_pickle=False)
    after = dict(challenger.model.named_parameters())
    for name, param in champion.model.named_parameters():
        if not name.startswith(("model.bert.pooler.", "model.classifier.")):
            assert torch.equal(param, after[name]), name
    for name, param in repaired.state_dict().items():
        torch.testing.assert_close(challenger.model.state_dict()[name], param, rtol=0, atol=0)
