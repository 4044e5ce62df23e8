"""The CLI sets every field of the typed settings, with the settings' own defaults and choices; bad
values are one sentence and exit 2 before any work; one store setting for both flows."""

import dataclasses
import re

import pytest
from pydantic import ValidationError
from typer.main import get_command
from typer.testing import CliRunner

from flows import cli
from flows.cli import app
from flows.settings import AuditSettings, CorrectionSettings, GateSettings, StoreSettings

GATE_FIELDS = tuple(GateSettings.model_fields)


def _defaults(command: str) -> dict:
    """Option name (Python identifier) -> default of a CLI command."""
    return {p.name: p.default for p in get_command(app).commands[command].params}


def test_the_help_choices_are_the_settings_choices():
    from audit.correction.config import STRATEGIES
    from audit.correction.search import CANDIDATES_BY_NAME
    from flows.settings import AUDIT_METHODS, CORRECTION_METHODS
    from registry_hooks.model_io import ALLOW_PICKLE_ENV

    assert cli.AUDIT_METHODS == AUDIT_METHODS and cli.CORRECTION_METHODS == CORRECTION_METHODS
    assert cli.STRATEGIES == STRATEGIES and cli.CANDIDATES == tuple(CANDIDATES_BY_NAME)
    assert cli.ALLOW_PICKLE_ENV == ALLOW_PICKLE_ENV
    from deploy.service import ServiceSettings
    from registry_hooks.registry import GUARD_MODES

    serve_help = " ".join(CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "400"}).output.split())
    assert f"({', '.join(GUARD_MODES)})" in serve_help and _defaults("serve")["guard"] == ServiceSettings().guard
    text = " ".join(CliRunner().invoke(app, ["correct", "--help"], env={"COLUMNS": "400"}).output.split())
    for choices in (CORRECTION_METHODS, STRATEGIES, tuple(CANDIDATES_BY_NAME)):
        assert ", ".join(choices) in text
    for name in GATE_FIELDS:
        assert f"--{name.replace('_', '-')}" in text


@pytest.mark.parametrize("command", ["correct", "serve"])
def test_correct_and_serve_set_every_correction_setting_with_its_default(command):
    defaults = _defaults(command)
    assert {name: defaults[name] for name in GATE_FIELDS} == GateSettings().model_dump()
    settings = CorrectionSettings()
    method = "method" if command == "correct" else "correction_method"
    assert (defaults["candidates"], defaults["strategy"], defaults[method]) == (None, None, None)
    assert settings.strategy is None and settings.method is None  # None: each candidate's own
    assert defaults["selection_fraction"] == settings.selection_fraction
    assert defaults["min_horizon_correlation"] == settings.min_horizon_correlation
    # and the settings they build from those defaults are the settings' defaults
    assert cli._correction_settings(None, None, None, defaults["selection_fraction"],
                                    defaults["min_horizon_correlation"],
                                    **{name: defaults[name] for name in GATE_FIELDS}) == settings


@pytest.mark.parametrize("command", ["audit", "serve"])
def test_audit_options_default_to_the_audit_settings(command):
    defaults = _defaults(command)
    settings = AuditSettings()
    assert (defaults["method"], defaults["top_k"], defaults["max_flagged"]) == (
        settings.method, settings.top_k, settings.max_flagged)
    assert defaults["model"] == settings.model_name and defaults["alias"] == settings.alias


@pytest.mark.parametrize("command", ["audit", "correct", "promote", "serve"])
def test_every_command_on_a_store_takes_a_tracking_uri_and_model_loaders_the_pickle_opt_in(command):
    defaults = _defaults(command)
    assert "tracking_uri" in defaults and defaults["tracking_uri"] is None
    if command != "promote":  # promote moves an alias and loads no model
        assert defaults["allow_pickle"] is False


@pytest.mark.parametrize("options, named", [
    (["--method", "tracin"], "method: Value error, influence method 'tracin' needs training checkpoints"),
    (["--method", "nope"], "method: Value error, unknown influence method 'nope'; choose one of ekfac"),
    (["--strategy", "forget"], "strategy: Value error, unknown repair strategy 'forget'; choose one of reinforce"),
    (["--candidates", "relabel,nope"], "candidates: Value error, unknown repair candidates ['nope']"),
    (["--max-canary-flip-rate", "1.5"], "gates.max_canary_flip_rate: Input should be less than or equal to 1"),
    (["--harm-significance", "0"], "gates.harm_significance: Input should be greater than 0"),
    (["--onnx-atol", "inf"], "gates.onnx_atol: Input should be a finite number"),
    (["--tracking-uri", ""], "tracking_uri: String should have at least 1 character"),
])
def test_correct_refuses_bad_settings_in_one_sentence_before_touching_the_store(options, named, tmp_path):
    result = CliRunner().invoke(app, ["correct", "some-run-id", "--workdir", str(tmp_path), *options])
    assert result.exit_code == 2
    assert result.output.startswith("error: invalid settings (") and result.output.count("\n") == 1
    assert named in result.output
    assert not any(tmp_path.iterdir())  # no MLflow store was created


def test_gate_settings_mirror_every_gate_threshold():
    from audit.gates import GateThresholds

    assert GATE_FIELDS == tuple(f.name for f in dataclasses.fields(GateThresholds))
    assert GateSettings().thresholds() == GateThresholds()
    changed = {"min_fix_rate": 0.9, "max_accuracy_drop_points": 1.0, "max_class_recall_drop_points": 3.0,
               "max_canary_flip_rate": 0.1, "onnx_rtol": 1e-2, "onnx_atol": 1e-3, "harm_resolution_examples": 0,
               "harm_significance": 0.05}
    assert set(changed) == set(GATE_FIELDS)
    assert CorrectionSettings(gates=changed).thresholds() == GateThresholds(**changed)


def test_the_correction_overrides_apply_to_every_candidate_and_nothing_else():
    from audit.correction import CorrectionConfig, RepairCandidate
    from audit.correction.search import CANDIDATES_BY_NAME

    plain = CorrectionSettings(candidates=("unlearn-gentle", "relabel"))
    assert plain.repair_candidates() == (CANDIDATES_BY_NAME["unlearn-gentle"], CANDIDATES_BY_NAME["relabel"])
    overridden = CorrectionSettings(candidates=("unlearn-gentle", "relabel"), strategy="reinforce", method="ekfac")
    for before, after in zip(plain.repair_candidates(), overridden.repair_candidates(), strict=True):
        assert after.name == before.name
        assert after.config == dataclasses.replace(before.config, strategy="reinforce", method="ekfac")
    # Python callers' own candidates get them too
    mine = RepairCandidate("mine", CorrectionConfig(lr=1e-3))
    (applied,) = overridden.repair_candidates((mine,))
    assert (applied.config.strategy, applied.config.method, applied.config.lr) == ("reinforce", "ekfac", 1e-3)


def test_the_correction_runs_gradcos_but_no_method_that_needs_checkpoints():
    assert CorrectionSettings(method="gradcos").method == "gradcos"
    with pytest.raises(ValidationError, match="needs training checkpoints, which the correction flow does not load"):
        CorrectionSettings(method="tracin")
    with pytest.raises(ValidationError, match="has no self-influence"):
        AuditSettings(method="gradcos")


@pytest.mark.parametrize("options, sentence", [
    (["--task", "sst2"], "error: --task sst2 needs --data DIR, an SST-2 folder holding train.tsv, dev.tsv and "
                         "test.tsv."),
    (["--task", "mnist"], "error: --task must be one of digits, sst2, images; got 'mnist'."),
])
def test_the_demo_refuses_a_bad_task_or_sst2_without_data_in_one_sentence(options, sentence, tmp_path):
    out = CliRunner().invoke(app, ["demo", *options, "--workdir", str(tmp_path / "w")])
    assert out.exit_code == 2
    assert [line for line in out.output.splitlines() if line.strip()] == [sentence]
    assert not (tmp_path / "w").exists()  # refused before any work


def test_the_demo_defaults_are_the_text_demo_defaults():
    from flows import demo_sst2

    defaults = _defaults("demo")
    assert defaults["task"] == "digits" and defaults["epochs"] is None  # each task's own
    assert (defaults["n_train"], defaults["n_validation"], defaults["n_production"]) == (
        demo_sst2.N_TRAIN, demo_sst2.N_VALIDATION, demo_sst2.N_PRODUCTION)
    assert (defaults["max_length"], defaults["trainable_layers"], defaults["noise_rate"]) == (
        demo_sst2.MAX_LENGTH, demo_sst2.TRAINABLE_LAYERS, demo_sst2.NOISE_RATE)
    assert cli.EPOCHS_BY_TASK["sst2"] == demo_sst2.EPOCHS and defaults["method"] == demo_sst2.METHOD


@pytest.mark.parametrize("model, values", [
    (AuditSettings, {"workdir": "w"}),  # the store has its own settings now
    (CorrectionSettings, {"tracking_uri": "http://mlflow"}),
    (CorrectionSettings, {"min_fix_rate": 0.9}),  # the gates are nested
    (StoreSettings, {"allow_pickles": True}),
])
def test_settings_refuse_fields_they_do_not_know(model, values):
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        model(**values)


def test_promote_acts_on_the_store_named_by_tracking_uri(mlflow_store, tmp_path):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from audit.demo.models import SmallResNet
    from registry_hooks.model_io import ModelSpec, log_classifier
    from registry_hooks.registry import register_challenger, register_version
    from registry_hooks.store import tracking_uri

    uris = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with mlflow.start_run():
            uris.append(log_classifier(SmallResNet(), ModelSpec((1, 8, 8), 10)))
    register_version(uris[0], "m", "champion")
    challenger = register_challenger(uris[1], "m", source_version="1", audit_run_id="a1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = CliRunner().invoke(app, ["promote", "--workdir", str(elsewhere), "--tracking-uri",
                                      tracking_uri(mlflow_store), "--model", "m"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri(mlflow_store))
    assert str(client.get_model_version_by_alias("m", "champion").version) == challenger
    assert not (elsewhere / "mlflow.db").exists()


def test_progress_bars_follow_the_audit_setting(prefect_harness, small_champion, capfd):
    from audit.flagged import write_batch
    from flows.audit_flow import audit

    workdir, frame = small_champion
    store = StoreSettings(workdir=workdir, allow_pickle=True)
    write_batch(frame.iloc[:2], workdir / "inbox" / "a.parquet")
    bar = re.compile(r"\d+%\|")  # tqdm's "desc: 50%|#####     | 1/2 [...]"
    audit(store, AuditSettings(model_name="m", method="graddot"))
    assert not bar.search(capfd.readouterr().err)
    write_batch(frame.iloc[2:], workdir / "inbox" / "b.parquet")
    audit(store, AuditSettings(model_name="m", method="graddot", progress=True))
    assert bar.search(capfd.readouterr().err)


def test_relocate_points_a_copied_store_at_its_own_artifacts_once(mlflow_store, tmp_path):
    """The store in the copy is rewritten once; a second run changes nothing; a folder without a
    store is one sentence and exit 2."""
    import shutil

    import mlflow

    with mlflow.start_run():
        mlflow.log_text("hello", "note.txt")
    copy = tmp_path / "copy"
    shutil.copytree(mlflow_store, copy)
    first = CliRunner().invoke(app, ["relocate", "--workdir", str(copy)])
    assert first.exit_code == 0 and f"moved from {mlflow_store.resolve()}" in first.output, first.output
    again = CliRunner().invoke(app, ["relocate", "--workdir", str(copy)])
    assert again.exit_code == 0 and "nothing changed" in again.output
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = CliRunner().invoke(app, ["relocate", "--workdir", str(empty)])
    assert refused.exit_code == 2 and "holds no MLflow store" in refused.output
