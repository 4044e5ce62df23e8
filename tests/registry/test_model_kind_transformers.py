"""Kind `transformers` (registry_hooks/model_kinds/transformers.py): a tiny random-init BERT
(tests/text_helpers.py, nothing downloaded) and its tokenizer log, digest-check and load back
through log_classifier / resolve_version / load_version on a real MLflow sqlite store, without
pickle and without the network."""

from __future__ import annotations

import copy
import socket

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from audit.errors import IntegrityError, InvalidInput
from audit.modalities import Pixels, Text
from audit.text_classifier import TextClassifier
from registry_hooks.model_io import DIGEST_PARAM, ModelSpec, load_version, log_classifier, resolve_version
from registry_hooks.model_kinds import KIND_PARAM, TransformersModel
from registry_hooks.model_kinds.transformers import ARCHITECTURE_PARAM, hub_offline
from registry_hooks.registry import register_version
from tests.text_helpers import encode, tiny_bert

MAX_LENGTH = 16
TEXTS = ["the movie was good", "awful boring plot and the music was sad", "fun", "loved it but the ending was slow"]


def _classifier(seed: int = 0, num_labels: int = 2):
    model, tokenizer = tiny_bert(num_labels=num_labels, seed=seed)
    return TextClassifier(model, tokenizer.pad_token_id), tokenizer


def _spec(tokenizer, num_classes: int = 2) -> ModelSpec:
    return ModelSpec((MAX_LENGTH,), num_classes, kind=TransformersModel(tokenizer=tokenizer))


def _log_and_register(model, spec: ModelSpec, name: str = "m") -> str:
    with mlflow.start_run() as run:
        uri = log_classifier(model, spec)
    register_version(uri, name, "champion")
    return run.info.run_id


def _one_sentence(message: str) -> bool:
    return message.endswith(".") and message.count(". ") == 0


def _artifacts(store):
    (folder,) = {p.parent.parent for p in (store / "mlruns").rglob("model.safetensors")}
    return folder


def test_a_bert_classifier_round_trips_with_its_tokenizer_without_pickle(mlflow_store):
    model, tokenizer = _classifier()
    run_id = _log_and_register(model, _spec(tokenizer))
    params = MlflowClient().get_run(run_id).data.params
    assert (params[KIND_PARAM], params[ARCHITECTURE_PARAM]) == ("transformers", "BertForSequenceClassification")
    ref = resolve_version("m", alias="champion")
    assert ref.spec == _spec(tokenizer) and ref.spec.kind.tokenizer is None  # the params hold no tokenizer
    loaded = load_version(ref, allow_pickle=False)
    assert isinstance(loaded.model, TextClassifier) and type(loaded.model.model) is type(model.model)
    assert not loaded.model.training and all(p.requires_grad for p in loaded.model.parameters())
    assert loaded.spec == ref.spec and loaded.model.pad_token_id == tokenizer.pad_token_id
    # The tokenizer came back from the files: it encodes text as the logged one does.
    ids = encode(tokenizer, TEXTS, MAX_LENGTH)
    assert torch.equal(encode(loaded.spec.kind.tokenizer, TEXTS, MAX_LENGTH), ids)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))
    folder = _artifacts(mlflow_store)
    assert not [p for p in folder.rglob("*") if p.suffix in (".pkl", ".pickle", ".pth", ".pt", ".bin")]
    for name in TransformersModel.files:  # the digest covers what load reads, and it all exists
        assert (folder / name).exists(), name


@pytest.mark.parametrize("swapped", ["model/model.safetensors", "components/tokenizer/tokenizer.json"])
def test_a_swapped_weight_or_tokenizer_file_is_refused_by_the_digest_before_loading(mlflow_store, tmp_path, swapped):
    model, tokenizer = _classifier(seed=0)
    _log_and_register(model, _spec(tokenizer))
    # The same files of another valid model: loading them would work, only the digest can refuse them.
    other, other_tokenizer = _classifier(seed=1)
    other.model.save_pretrained(tmp_path / "model")
    other_tokenizer.add_tokens(["extra"])
    other_tokenizer.save_pretrained(tmp_path / "components" / "tokenizer")
    target = _artifacts(mlflow_store) / swapped
    assert target.read_bytes() != (tmp_path / swapped).read_bytes()
    target.write_bytes((tmp_path / swapped).read_bytes())
    with pytest.raises(IntegrityError, match="differ from those logged with it") as refused:
        load_version(resolve_version("m", alias="champion"), allow_pickle=False)
    assert _one_sentence(str(refused.value))


def test_a_repaired_copy_logged_with_the_loaded_spec_is_the_same_kind_with_the_tokenizer(mlflow_store):
    model, tokenizer = _classifier()
    _log_and_register(model, _spec(tokenizer))
    loaded = load_version(resolve_version("m", alias="champion"), allow_pickle=False)
    repaired = copy.deepcopy(loaded.model)  # what repair_batch starts from
    with torch.no_grad():
        repaired.model.classifier.bias += torch.tensor([0.5, -0.5])
    with mlflow.start_run() as run:
        uri = log_classifier(repaired, loaded.spec)
    version = register_version(uri, "m", "candidate")
    assert MlflowClient().get_run(run.info.run_id).data.params[KIND_PARAM] == "transformers"
    ref = resolve_version("m", alias="candidate")
    assert ref.version == str(version) and ref.spec == loaded.spec
    again = load_version(ref, allow_pickle=False)
    ids = encode(again.spec.kind.tokenizer, TEXTS, MAX_LENGTH)
    with torch.no_grad():
        assert torch.equal(again.model(ids), repaired(ids))
        assert not torch.equal(again.model(ids), model(ids))


def test_logging_makes_no_network_request_even_for_a_model_named_after_a_hub_repository(mlflow_store, monkeypatch):
    model, tokenizer = _classifier()
    # What a model fetched from the Hub carries: MLflow asks the Hub for this repository's licence.
    model.model.name_or_path = model.model.config.name_or_path = "google-bert/bert-base-uncased"
    attempts = []  # every host name looked up or internet address connected to (the store is a local file)
    real_connect = socket.socket.connect

    def lookup(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror("no network in this test")

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("no network in this test")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    _log_and_register(model, _spec(tokenizer))
    assert attempts == []
    assert constants.HF_HUB_OFFLINE == before  # the offline switch was scoped to the logging
    loaded = load_version(resolve_version("m", alias="champion"), allow_pickle=False)
    assert attempts == []
    ids = encode(tokenizer, TEXTS, MAX_LENGTH)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))


def test_hub_offline_refuses_hub_requests_inside_the_block_only():
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    with hub_offline():
        assert constants.is_offline_mode()
    assert constants.HF_HUB_OFFLINE == before


def _refusals():
    model, tokenizer = _classifier()
    plain = torch.nn.Linear(MAX_LENGTH, 2)
    other_pad = TextClassifier(model.model, 3)
    return [
        (plain, _spec(tokenizer), "the model is Linear"),
        (TextClassifier(plain, 0), _spec(tokenizer), "the model is a TextClassifier around a Linear"),
        (model, ModelSpec((MAX_LENGTH,), 2, kind=TransformersModel()),
         r"pass it as TransformersModel\(tokenizer=...\)"),
        (other_pad, _spec(tokenizer), "masks token id 3 as padding but the tokenizer pads with 0"),
        (model, _spec(tokenizer, num_classes=3), "has 2 labels but the ModelSpec says 3 classes"),
        (model, ModelSpec((MAX_LENGTH,), 2, kind=TransformersModel(tokenizer=tokenizer),
                          modality=Pixels((MAX_LENGTH,))), "reads text .* names the pixels modality"),
        (model, ModelSpec((65,), 2, kind=TransformersModel(tokenizer=tokenizer)), "of at most 64 tokens"),
    ]


def test_a_text_spec_gets_the_text_modality_and_refuses_a_shape_that_is_not_a_token_count():
    _, tokenizer = _classifier()
    assert ModelSpec((MAX_LENGTH,), 2, kind=TransformersModel(tokenizer=tokenizer)).modality == Text(MAX_LENGTH)
    with pytest.raises(InvalidInput, match=r"is \(max_length,\)"):
        ModelSpec((4, 4), 2, kind=TransformersModel(tokenizer=tokenizer))


def test_a_model_the_kind_cannot_store_is_refused_in_one_sentence_before_anything_is_logged(mlflow_store):
    with mlflow.start_run() as run:
        for model, spec, says in _refusals():
            with pytest.raises(InvalidInput, match=says) as refused:
                log_classifier(model, spec)
            assert _one_sentence(str(refused.value)), str(refused.value)
    assert MlflowClient().get_run(run.info.run_id).data.params == {}


def test_a_model_that_is_not_a_sequence_classifier_is_refused():
    from transformers import BertModel

    model, tokenizer = _classifier()
    encoder = TextClassifier(BertModel(model.model.config), tokenizer.pad_token_id)
    with pytest.raises(InvalidInput, match="a BertModel is not one") as refused:
        TransformersModel(tokenizer=tokenizer).check(encoder, _spec(tokenizer))
    assert _one_sentence(str(refused.value))


def test_the_kind_compares_equal_whatever_tokenizer_it_holds():
    _, tokenizer = _classifier()
    with_tokenizer = TransformersModel(tokenizer=tokenizer)
    assert with_tokenizer == TransformersModel() and hash(with_tokenizer) == hash(TransformersModel())
    assert "tokenizer" not in repr(with_tokenizer) and with_tokenizer.params() == {}
    assert DIGEST_PARAM not in with_tokenizer.params()


def _folder(tmp_path, model, tokenizer, flavor: dict | None):
    import yaml

    folder = tmp_path / "logged"
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "components" / "tokenizer")
    (folder / "MLmodel").write_text(yaml.safe_dump({"flavors": {} if flavor is None else {"transformers": flavor}}))
    return folder


FLAVOR = {"model_binary": "model", "components": ["tokenizer"]}


def test_files_that_do_not_rebuild_the_classifier_are_refused_without_loading_them(tmp_path):
    """What load refuses even in verified files (e.g. written by hand, not by log_classifier)."""
    from transformers import BertModel

    model, tokenizer = _classifier()
    spec = _spec(tokenizer)
    kind = TransformersModel()
    # An encoder without the classification head: its weights would be silently initialised.
    encoder = _folder(tmp_path / "encoder", BertModel(model.model.config), tokenizer, FLAVOR)
    with pytest.raises(IntegrityError, match="do not fit a BertForSequenceClassification") as refused:
        kind.load(encoder, spec)
    assert _one_sentence(str(refused.value))
    with pytest.raises(IntegrityError, match="does not describe a transformers model"):
        kind.load(_folder(tmp_path / "other", model.model, tokenizer, None), spec)
    # Pickled weights only (pytorch_model.bin): never read.
    pickled = _folder(tmp_path / "pickled", model.model, tokenizer, FLAVOR)
    (pickled / "model" / "model.safetensors").unlink()
    torch.save(model.model.state_dict(), pickled / "model" / "pytorch_model.bin")
    with pytest.raises(IntegrityError, match="do not rebuild a transformers model and tokenizer") as refused:
        kind.load(pickled, spec)
    assert _one_sentence(str(refused.value)), str(refused.value)
    rebuilt, loaded_kind = kind.load(_folder(tmp_path / "good", model.model, tokenizer, FLAVOR), spec)
    ids = encode(tokenizer, TEXTS, MAX_LENGTH)
    with torch.no_grad():
        assert torch.equal(rebuilt(ids), model(ids)) and loaded_kind.tokenizer is not None
