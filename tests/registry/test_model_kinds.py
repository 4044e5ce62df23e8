"""Model kinds (registry_hooks/model_kinds): each kind logs, digest-checks and loads back through
log_classifier / resolve_version / load_version, on a real MLflow sqlite store."""

import copy
import dataclasses
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from audit.demo.models import SmallResNet
from audit.errors import IntegrityError, InvalidInput, LineageError
from registry_hooks.model_io import (
    DIGEST_PARAM,
    ModelSpec,
    PickleNotAllowed,
    artifact_digest,
    load_version,
    log_classifier,
    resolve_version,
)
from registry_hooks.model_kinds import KIND_PARAM, ModelKind, PyTorchModule, TorchvisionModel, register
from registry_hooks.model_kinds.state_dict import load_state_dict_into, log_state_dict_model
from registry_hooks.registry import register_version

IMAGE_SHAPE = (3, 32, 32)
RESNET = TorchvisionModel("resnet18", {"num_classes": 10})


def _resnet(seed: int) -> torch.nn.Module:
    """A random-init resnet18 whose BatchNorm running statistics differ from a fresh build's (one
    forward pass in train mode), so a load that dropped the buffers would change the logits."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    with torch.no_grad():
        model.train()(torch.randn(4, *IMAGE_SHAPE))
    return model.eval()


def _log_and_register(model: torch.nn.Module, spec: ModelSpec, name: str = "m") -> str:
    with mlflow.start_run() as run:
        uri = log_classifier(model, spec)
    register_version(uri, name, "champion")
    return run.info.run_id


def _one_sentence(message: str) -> bool:
    return message.endswith(".") and message.count(". ") == 0


def _fixed_input() -> torch.Tensor:
    return torch.randn(3, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(7))


def test_a_torchvision_resnet_round_trips_without_the_pickle_opt_in_and_gives_identical_logits(mlflow_store):
    model = _resnet(0)
    run_id = _log_and_register(model, ModelSpec(IMAGE_SHAPE, 10, kind=RESNET))
    params = MlflowClient().get_run(run_id).data.params
    assert (params[KIND_PARAM], params["torchvision_builder"], json.loads(params["torchvision_kwargs"])) == (
        "torchvision", "resnet18", {"num_classes": 10})
    ref = resolve_version("m", alias="champion")
    assert ref.spec == ModelSpec(IMAGE_SHAPE, 10, kind=RESNET)
    loaded = load_version(ref, allow_pickle=False)
    assert type(loaded.model) is type(model) and not loaded.model.training
    assert loaded.spec.kind == RESNET
    x = _fixed_input()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert all(p.requires_grad for p in loaded.model.parameters())  # the correction fine-tunes it
    # No pickle anywhere in what was logged: the weights are a safetensors file.
    (folder,) = {p.parent.parent for p in (mlflow_store / "mlruns").rglob("model.safetensors")}
    assert not list(folder.rglob("*.pth")) and not list(folder.rglob("*.pkl"))


def test_a_swapped_safetensors_file_is_refused_by_the_digest_before_loading(mlflow_store):
    from safetensors.torch import save_model

    _log_and_register(_resnet(0), ModelSpec(IMAGE_SHAPE, 10, kind=RESNET))
    (weights,) = (mlflow_store / "mlruns").rglob("model.safetensors")
    # Valid weights of the same architecture: loading them would succeed, only the digest can refuse them.
    save_model(_resnet(1), str(weights))
    with pytest.raises(IntegrityError, match="differ from those logged with it") as refused:
        load_version(resolve_version("m", alias="champion"), allow_pickle=False)
    assert _one_sentence(str(refused.value))


def test_a_plain_module_still_logs_as_the_pickled_pytorch_kind_and_needs_the_opt_in(mlflow_store):
    torch.manual_seed(0)
    model = SmallResNet()
    run_id = _log_and_register(model, ModelSpec((1, 8, 8), 10))
    assert MlflowClient().get_run(run_id).data.params[KIND_PARAM] == "pytorch"
    ref = resolve_version("m", alias="champion")
    assert ref.spec.kind == PyTorchModule()
    with pytest.raises(PickleNotAllowed):
        load_version(ref, allow_pickle=False)
    x = torch.rand(3, 1, 8, 8) * 16
    assert torch.equal(load_version(ref, allow_pickle=True).model(x), model.eval()(x))


def test_a_version_logged_before_kinds_were_recorded_is_the_pytorch_kind(mlflow_store):
    torch.manual_seed(0)
    model = SmallResNet().eval()
    with mlflow.start_run():  # what log_classifier logged before model kinds: no `model_kind` param
        mlflow.log_params({"input_shape": "1x8x8", "num_classes": "10"})
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle")
        folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(mlflow_store / "dl")))
        mlflow.log_param(DIGEST_PARAM, artifact_digest(folder))
    register_version(info.model_uri, "m", "champion")
    ref = resolve_version("m", alias="champion")
    assert ref.spec == ModelSpec((1, 8, 8), 10) and ref.spec.kind == PyTorchModule()
    with pytest.raises(PickleNotAllowed):
        load_version(ref, allow_pickle=False)
    x = torch.rand(3, 1, 8, 8) * 16
    assert torch.equal(load_version(ref, allow_pickle=True).model(x), model(x))


def test_registering_a_repaired_copy_through_the_correct_flow_keeps_the_kind(mlflow_store):
    from audit.correction import RepairResult
    from audit.examples import ExampleTable
    from flows.correct_flow import AuditInputs, register
    from registry_hooks.lineage import log_training_data

    table = ExampleTable(("a", "b"), torch.zeros(2, *IMAGE_SHAPE), torch.tensor([0, 1]))
    with mlflow.start_run():
        log_training_data(table, table)  # the lineage a repair re-records
        uri = log_classifier(_resnet(0), ModelSpec(IMAGE_SHAPE, 10, (-4.0, 4.0), RESNET))
    register_version(uri, "m", "champion")
    loaded = load_version(resolve_version("m", alias="champion"), allow_pickle=False)
    repaired = copy.deepcopy(loaded.model)  # what repair_batch starts from
    with torch.no_grad():
        repaired.fc.bias += 0.5
    inputs = AuditInputs("audit-run", loaded, table, table, table, "digest", pd.DataFrame(), "graddot")
    with mlflow.start_run() as run:
        version = register.fn(inputs, RepairResult(repaired, 1, 1, ("a",), {}, ()))
    params = MlflowClient().get_run(run.info.run_id).data.params
    assert (params[KIND_PARAM], params["torchvision_builder"]) == ("torchvision", "resnet18")
    ref = resolve_version("m", version=version)
    assert ref.spec == loaded.spec  # same kind, shape, classes and input range as the source version
    x = _fixed_input()
    with torch.no_grad():
        assert torch.equal(load_version(ref, allow_pickle=False).model(x), repaired(x))


def test_a_model_that_is_not_the_declared_architecture_is_refused_before_anything_is_logged(mlflow_store):
    with mlflow.start_run() as run:
        with pytest.raises(InvalidInput, match=r"do not fit torchvision's resnet18\(num_classes=7\)") as refused:
            log_classifier(_resnet(0), ModelSpec(IMAGE_SHAPE, 7, kind=TorchvisionModel("resnet18", {"num_classes": 7})))
        with pytest.raises(InvalidInput, match="not the ResNet that torchvision's resnet18"):
            log_classifier(SmallResNet(), ModelSpec((1, 8, 8), 10, kind=RESNET))
    assert _one_sentence(str(refused.value))
    assert MlflowClient().get_run(run.info.run_id).data.params == {}


@pytest.mark.parametrize(("builder", "kwargs", "says"), [
    ("resnet_nope", {}, "has no classification model 'resnet_nope'"),
    ("resnet18", {"weights": "DEFAULT"}, "Do not pass weights"),
    ("resnet18", {"num_classes": object()}, "must be JSON values"),
])
def test_a_torchvision_kind_that_cannot_be_recorded_or_rebuilt_is_one_sentence(builder, kwargs, says):
    with pytest.raises(InvalidInput, match=says) as refused:
        TorchvisionModel(builder, kwargs)
    assert _one_sentence(str(refused.value))


# A fourth kind, defined and registered outside registry_hooks: one module's worth of code.
@dataclasses.dataclass(frozen=True)
class SmallResNetWeights(ModelKind):
    """audit.demo.models.SmallResNet rebuilt from a safetensors state dict."""

    name = "test_small_resnet"
    needs_pickle = False

    def log(self, model, spec):
        return log_state_dict_model(model, spec, "test_small_resnet", {}, [])

    def load(self, folder, spec):
        return load_state_dict_into(SmallResNet(), folder), self


@pytest.fixture
def small_resnet_kind():
    with register(SmallResNetWeights) as kind:
        yield kind


def test_a_kind_registered_outside_the_package_round_trips(mlflow_store, small_resnet_kind):
    torch.manual_seed(0)
    model = SmallResNet().eval()
    run_id = _log_and_register(model, ModelSpec((1, 8, 8), 10, kind=small_resnet_kind()))
    assert MlflowClient().get_run(run_id).data.params[KIND_PARAM] == "test_small_resnet"
    loaded = load_version(resolve_version("m", alias="champion"), allow_pickle=False)
    x = torch.rand(3, 1, 8, 8) * 16
    assert torch.equal(loaded.model(x), model(x)) and loaded.spec.kind == small_resnet_kind()


def test_an_unknown_recorded_kind_is_refused_in_one_sentence(mlflow_store):
    torch.manual_seed(0)
    with register(SmallResNetWeights):
        _log_and_register(SmallResNet(), ModelSpec((1, 8, 8), 10, kind=SmallResNetWeights()))
    # The module that registered the kind is not installed here (any more).
    with pytest.raises(LineageError, match="records `model_kind` 'test_small_resnet', which this installation cannot "
                                           r"load \(known kinds: pytorch, torchvision, transformers\)") as refused:
        resolve_version("m", alias="champion")
    assert _one_sentence(str(refused.value))


def test_a_kind_needs_a_name_and_a_pickle_flag_and_no_name_twice():
    @dataclasses.dataclass(frozen=True)
    class Nameless(SmallResNetWeights):
        name = "Not A Name"

    @dataclasses.dataclass(frozen=True)
    class Undecided(SmallResNetWeights):
        name = "undecided"
        needs_pickle = None

    with pytest.raises(InvalidInput, match="lower-case letters"):
        register(Nameless)
    with pytest.raises(InvalidInput, match="needs_pickle: bool"):
        register(Undecided)
    with register(SmallResNetWeights), pytest.raises(InvalidInput, match="already registered"):
        register(SmallResNetWeights)
