"""The registry guard on a real MLflow registry (sqlite): what it keeps, restores and flags, and the
champion of record that `promote` and `register_version` leave for it."""

import pytest
from mlflow.tracking import MlflowClient

from audit.errors import AuditError
from registry_hooks.registry import (
    CHAMPION_OF_RECORD,
    GUARD,
    guard_champion,
    promote,
)
from registry_hooks.tags import VersionTags


def _versions(client: MlflowClient, name: str, gated: list[bool]) -> list[str]:
    """Versions 1.. of `name` (no model files: the guard reads only tags and aliases)."""
    client.create_registered_model(name)
    experiment = client.get_experiment_by_name("model-audit").experiment_id
    versions = []
    for i, passed in enumerate(gated):
        run = client.create_run(experiment).info.run_id
        tags = VersionTags("1", f"audit-{i}").to_mlflow() if passed else {}
        versions.append(client.create_model_version(name, f"runs:/{run}/model", run, tags=tags).version)
    return [str(v) for v in versions]


def _champion(client: MlflowClient, name: str) -> str:
    return str(client.get_model_version_by_alias(name, "champion").version)


def test_promote_records_the_champion_the_guard_keeps(mlflow_store):
    client = MlflowClient()
    _, gated = _versions(client, "m", [False, True])
    assert promote("m", gated, client=client) == gated
    assert client.get_registered_model("m").tags[CHAMPION_OF_RECORD] == gated
    outcome = guard_champion(client, "m", gated)
    assert (outcome.action, _champion(client, "m")) == ("kept", gated)
    assert GUARD not in client.get_model_version("m", gated).tags


def test_an_ungated_move_is_restored_and_the_restore_is_kept_not_looped(mlflow_store):
    client = MlflowClient()
    _, gated, ungated = _versions(client, "m", [False, True, False])
    promote("m", gated, client=client)
    client.set_registered_model_alias("m", "champion", ungated)  # what the MLflow UI does

    outcome = guard_champion(client, "m", ungated)
    assert (outcome.action, outcome.restored_to, _champion(client, "m")) == ("restored", gated, gated)
    note = client.get_model_version("m", ungated).tags[GUARD]
    assert note.startswith("restored: @champion was moved to version 3, which lacks audit.gates=passed")
    assert client.get_registered_model("m").tags[GUARD].startswith(f"version {ungated} restored:")
    # the restore is itself an alias event: it must be kept, or the guard would loop
    assert guard_champion(client, "m", gated).action == "kept"
    # the event of the ungated move, delivered again: champion is elsewhere now, nothing to do
    assert guard_champion(client, "m", ungated).action == "stale" and _champion(client, "m") == gated


def test_flag_mode_leaves_the_move_and_tags_it(mlflow_store):
    client = MlflowClient()
    _, gated, ungated = _versions(client, "m", [False, True, False])
    promote("m", gated, client=client)
    client.set_registered_model_alias("m", "champion", ungated)
    outcome = guard_champion(client, "m", ungated, mode="flag")
    assert (outcome.action, _champion(client, "m")) == ("flagged", ungated)
    assert client.get_model_version("m", ungated).tags[GUARD].startswith(
        "flagged: @champion was moved to version 3, which lacks audit.gates=passed")
    assert "champion of record: version 2" in outcome.message


def test_a_gated_move_made_outside_promote_becomes_the_champion_of_record(mlflow_store):
    client = MlflowClient()
    _, first, second, ungated = _versions(client, "m", [False, True, True, False])
    promote("m", first, client=client)
    client.set_registered_model_alias("m", "champion", second)
    assert guard_champion(client, "m", second).action == "kept"
    assert client.get_registered_model("m").tags[CHAMPION_OF_RECORD] == second
    client.set_registered_model_alias("m", "champion", ungated)
    assert guard_champion(client, "m", ungated).restored_to == second


def test_the_baseline_registered_as_champion_is_of_record(mlflow_store):
    import mlflow

    from audit.demo.models import SmallResNet
    from registry_hooks.model_io import ModelSpec, log_classifier
    from registry_hooks.registry import register_version

    client = MlflowClient()
    _, _, ungated = _versions(client, "m", [False, False, False])
    with mlflow.start_run():
        uri = log_classifier(SmallResNet(), ModelSpec((1, 8, 8), 10))
    baseline = register_version(uri, "m", "champion")  # what the demo's training does
    assert guard_champion(client, "m", baseline).action == "kept"
    client.set_registered_model_alias("m", "champion", ungated)
    assert guard_champion(client, "m", ungated).restored_to == baseline


def test_without_a_champion_of_record_a_move_can_only_be_flagged(mlflow_store):
    client = MlflowClient()
    (ungated,) = _versions(client, "m", [False])
    client.set_registered_model_alias("m", "champion", ungated)  # a model never promoted by model-audit
    outcome = guard_champion(client, "m", ungated)
    assert outcome.action == "flagged" and "no champion of record" in outcome.message
    assert _champion(client, "m") == ungated


def test_a_champion_of_record_that_was_deleted_is_not_restored(mlflow_store):
    client = MlflowClient()
    _, gated, ungated = _versions(client, "m", [False, True, False])
    promote("m", gated, client=client)
    client.set_registered_model_alias("m", "champion", ungated)
    client.delete_model_version("m", gated)
    outcome = guard_champion(client, "m", ungated)
    assert outcome.action == "flagged" and "moving it back to version 2 failed" in outcome.message
    assert _champion(client, "m") == ungated


def test_an_unknown_guard_mode_is_refused(mlflow_store):
    with pytest.raises(AuditError, match="Unknown registry guard mode 'off'"):
        guard_champion(MlflowClient(), "m", "1", mode="off")
