"""Registering, aliasing and promoting versions on a real MLflow registry (sqlite)."""

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from audit.demo.models import SmallResNet
from audit.errors import AuditError
from registry_hooks.model_io import ModelSpec, load_version, log_classifier, resolve_version
from registry_hooks.registry import promote, register_challenger, register_version


def _logged_model(seed=0):
    torch.manual_seed(seed)
    model = SmallResNet()
    with mlflow.start_run() as run:
        uri = log_classifier(model, ModelSpec((1, 8, 8), 10))
    return model, uri, run.info.run_id


def test_logged_model_round_trips_with_its_spec(mlflow_store):
    model, uri, run_id = _logged_model()
    version = register_version(uri, "m", "champion")
    ref = resolve_version("m", alias="champion")
    assert (ref.version, ref.run_id, ref.spec) == (version, run_id, ModelSpec((1, 8, 8), 10))
    loaded = load_version(ref, allow_pickle=True).model
    x = torch.rand(3, 1, 8, 8) * 16
    # The pickled module keeps a dynamic batch size and stays trainable (pt2 would not).
    assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)
    assert all(p.requires_grad for p in loaded.parameters())


def test_challenger_carries_the_design_tags_and_promotion_rechecks_them(mlflow_store):
    _, uri, _ = _logged_model(0)
    champion = register_version(uri, "m", "champion")
    with pytest.raises(AuditError, match="no `audit.gates=passed` tag"):
        promote("m", champion)
    _, uri2, _ = _logged_model(1)
    challenger = register_challenger(uri2, "m", source_version=champion, audit_run_id="abc")
    mv = MlflowClient().get_model_version("m", challenger)
    assert mv.tags == {"audit.source_version": champion, "audit.audit_run_id": "abc", "audit.gates": "passed"}
    assert str(MlflowClient().get_model_version_by_alias("m", "challenger").version) == challenger
    assert promote("m") == challenger
    assert str(MlflowClient().get_model_version_by_alias("m", "champion").version) == challenger


def test_unknown_alias_is_one_clear_error(mlflow_store):
    with pytest.raises(Exception, match="No registered model nope @champion"):
        resolve_version("nope", alias="champion")


def test_promote_never_moves_champion_backwards_without_a_reason(mlflow_store):
    _, uri, _ = _logged_model(0)
    register_version(uri, "m", "champion")
    older = register_challenger(_logged_model(1)[1], "m", source_version="1", audit_run_id="a1")
    newer = register_challenger(_logged_model(2)[1], "m", source_version="1", audit_run_id="a2")
    assert promote("m", newer) == newer
    with pytest.raises(AuditError, match=f"Version {older} of m is older than champion version {newer}"):
        promote("m", older)
    with pytest.raises(AuditError, match="needs --force with --reason"):
        promote("m", older, force_reason="  ")
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("m", "champion").version) == newer
    assert promote("m", older, force_reason="v3 misroutes class 7") == older
    assert str(client.get_model_version_by_alias("m", "champion").version) == older
    assert client.get_model_version("m", older).tags["audit.promotion_override"] == (
        f"rollback from version {newer}: v3 misroutes class 7")


class _Payload:
    """Unpickling this writes a marker file: what a swapped model.pth could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_model_file_swapped_in_the_artifact_store_is_refused_before_it_runs(mlflow_store, tmp_path):
    import pickle

    from audit.errors import IntegrityError

    _, uri, _ = _logged_model(0)
    register_version(uri, "m", "champion")
    ref = resolve_version("m", alias="champion")
    assert ref.model_digest and load_version(ref, allow_pickle=True).model is not None
    (weights,) = [p for p in (mlflow_store / "mlruns").rglob("model.pth")]
    marker = tmp_path / "payload-ran"
    weights.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(IntegrityError, match="differ from those logged with it"):
        load_version(resolve_version("m", alias="champion"), allow_pickle=True)
    assert not marker.exists()


def test_a_version_without_a_recorded_digest_is_refused(mlflow_store):
    import dataclasses

    from audit.errors import IntegrityError

    _, uri, _ = _logged_model(0)
    register_version(uri, "m", "champion")
    ref = dataclasses.replace(resolve_version("m", alias="champion"), model_digest=None)
    with pytest.raises(IntegrityError, match="has no recorded `model_digest`"):
        load_version(ref, allow_pickle=True)


def test_mlflow_refusing_pickle_is_one_sentence(mlflow_store, monkeypatch):
    from audit.errors import IntegrityError

    _, uri, _ = _logged_model(0)
    register_version(uri, "m", "champion")
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(IntegrityError, match="MLflow refused to load version 1 of m"):
        load_version(resolve_version("m", alias="champion"), allow_pickle=True)
