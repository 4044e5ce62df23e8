"""What a logged model records about its inputs, and the opt-in that unpickling needs (real MLflow sqlite store)."""

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from audit.demo.models import SmallResNet
from audit.errors import InvalidInput, LineageError
from registry_hooks.model_io import (
    ALLOW_PICKLE_ENV,
    ALLOW_PICKLE_FLAG,
    ModelSpec,
    PickleNotAllowed,
    load_version,
    log_classifier,
    resolve_version,
)
from registry_hooks.registry import register_version


def _register(spec: ModelSpec) -> str:
    torch.manual_seed(0)
    with mlflow.start_run() as run:
        uri = log_classifier(SmallResNet(), spec)
    register_version(uri, "m", "champion")
    return run.info.run_id


def test_the_training_input_range_is_recorded_and_read_back_exactly(mlflow_store, digits_splits):
    inputs = digits_splits.train.inputs
    run_id = _register(ModelSpec.for_training(inputs, 10))
    params = MlflowClient().get_run(run_id).data.params
    assert (float(params["input_min"]), float(params["input_max"])) == (float(inputs.min()), float(inputs.max()))
    spec = resolve_version("m", alias="champion").spec
    assert spec == ModelSpec((1, 8, 8), 10, (float(inputs.min()), float(inputs.max())))


def test_a_model_logged_without_a_range_has_none(mlflow_store):
    run_id = _register(ModelSpec((1, 8, 8), 10))
    assert "input_min" not in MlflowClient().get_run(run_id).data.params
    assert resolve_version("m", alias="champion").spec.input_range is None


@pytest.mark.parametrize("recorded", [{"input_min": "0.0"}, {"input_min": "nan", "input_max": "16.0"},
                                      {"input_min": "16.0", "input_max": "0.0"}, {"input_min": "a", "input_max": "1"}])
def test_an_unusable_recorded_range_is_one_sentence(recorded):
    with pytest.raises(LineageError, match="records an unusable input range"):
        ModelSpec.from_params({"input_shape": "1x8x8", "num_classes": "10", **recorded})


def test_tuned_params_are_recorded_and_only_they_are_trainable_once_loaded(mlflow_store):
    spec = ModelSpec((1, 8, 8), 10, tuned_params=("head.",))
    run_id = _register(spec)
    assert MlflowClient().get_run(run_id).data.params["tuned_params"] == '["head."]'
    ref = resolve_version("m", alias="champion")
    assert ref.spec == spec
    model = load_version(ref, allow_pickle=True).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("head.")} != set()


def test_tuned_params_that_select_nothing_are_refused_before_anything_is_logged(mlflow_store):
    with mlflow.start_run() as run:
        with pytest.raises(InvalidInput, match=r"selects none of the model's parameters"):
            log_classifier(SmallResNet(), ModelSpec((1, 8, 8), 10, tuned_params=("encoder.layer.5.",)))
    assert MlflowClient().get_run(run.info.run_id).data.params == {}
    with pytest.raises(InvalidInput, match="non-empty list of parameter-name prefixes"):
        ModelSpec((1, 8, 8), 10, tuned_params="fc.")


class _Payload:
    """Unpickling this writes a marker file: what a malicious model.pth could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_without_the_opt_in_nothing_is_downloaded_or_unpickled(mlflow_store, tmp_path):
    import pickle

    _register(ModelSpec((1, 8, 8), 10))
    ref = resolve_version("m", alias="champion")
    marker = tmp_path / "payload-ran"
    (weights,) = list((mlflow_store / "mlruns").rglob("model.pth"))
    weights.write_bytes(pickle.dumps(_Payload(marker)))
    # refused before the files are even fetched: not the digest mismatch a download would find
    with pytest.raises(PickleNotAllowed) as refused:
        load_version(ref, allow_pickle=False)
    message = str(refused.value)
    assert ALLOW_PICKLE_FLAG in message and f"{ALLOW_PICKLE_ENV}=1" in message and message.count(". ") == 0
    assert not marker.exists()
