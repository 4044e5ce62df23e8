"""audit.text_classifier.TextClassifier on a tiny random-init BERT (tests/text_helpers.py, nothing
downloaded): the logits of the HF model with its 2-D padding mask, from one int64 tensor; the
ONNX parity gate; the influence engine on its vmap path, agreeing with the batched path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

from audit.errors import InvalidInput
from audit.text_classifier import TextClassifier, attention_bias, pad_token_id_of
from tests.text_helpers import encode, tiny_bert, tiny_tokenizer

TEXTS = ["the movie was good", "awful boring plot and the music was sad", "fun", "not the worst film but slow",
         "loved it", "hated the ending and the acting", "a great story", "very very bad"]
LENGTH = 12


@pytest.fixture(scope="module")
def bert():
    model, tokenizer = tiny_bert(num_labels=3)
    return TextClassifier(model, tokenizer.pad_token_id), tokenizer


def _ids(tokenizer, length: int = LENGTH) -> torch.Tensor:
    return encode(tokenizer, TEXTS, length)


def _one_sentence(message: str) -> bool:
    return message.endswith(".") and message.count(". ") == 0


def test_logits_are_the_hf_models_with_its_2d_padding_mask(bert):
    wrapper, tokenizer = bert
    ids = _ids(tokenizer)
    assert ids.dtype == torch.int64 and (ids == tokenizer.pad_token_id).any()  # really padded
    with torch.no_grad():
        got = wrapper(ids)
        want = wrapper.model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits
        unmasked = wrapper.model(input_ids=ids).logits
    assert got.shape == (len(TEXTS), 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, unmasked, atol=1e-3)  # the mask matters, so the check is not vacuous


def test_logits_do_not_depend_on_how_much_padding_follows(bert):
    wrapper, tokenizer = bert
    with torch.no_grad():
        torch.testing.assert_close(wrapper(_ids(tokenizer, 24)), wrapper(_ids(tokenizer, LENGTH)), rtol=1e-5, atol=1e-6)


def test_the_attention_bias_is_zero_for_tokens_and_the_dtype_minimum_for_padding():
    bias = attention_bias(torch.tensor([[2, 7, 3, 0, 0]]), 0, torch.float64)
    assert bias.shape == (1, 1, 1, 5) and bias.dtype == torch.float64
    assert bias.flatten().tolist() == [0.0, 0.0, 0.0, torch.finfo(torch.float64).min, torch.finfo(torch.float64).min]


def test_wrapper_follows_the_wrapped_models_mode_and_parameters(bert):
    wrapper, _ = bert
    assert list(wrapper.parameters()) == list(wrapper.model.parameters())
    wrapper.train()
    assert wrapper.model.training
    wrapper.eval()
    assert not wrapper.model.training


def test_float_or_unbatched_inputs_are_refused_in_one_sentence(bert):
    wrapper, _ = bert
    for bad in (torch.zeros(2, LENGTH), torch.zeros(LENGTH, dtype=torch.int64)):
        with pytest.raises(InvalidInput, match="integer token ids") as refused:
            wrapper(bad)
        assert _one_sentence(str(refused.value))


def test_a_tokenizer_without_a_pad_token_is_refused_in_one_sentence():
    tokenizer = tiny_tokenizer()
    assert pad_token_id_of(tokenizer) == 0
    tokenizer.pad_token = None
    with pytest.raises(InvalidInput, match="has no pad token") as refused:
        pad_token_id_of(tokenizer)
    assert _one_sentence(str(refused.value))
    with pytest.raises(InvalidInput, match="pad token id"):
        TextClassifier(torch.nn.Linear(2, 2), None)


def test_importing_the_wrapper_does_not_import_transformers():
    code = "import sys\nimport audit.text_classifier\nprint('transformers' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_onnx_parity_gate_passes_on_int64_token_ids_with_a_dynamic_batch(bert, tmp_path):
    import onnxruntime as ort

    from audit.gates.onnx_parity import EXPORT_BATCH, INPUT_NAME, onnx_parity_gate

    wrapper, tokenizer = bert
    ids = _ids(tokenizer)
    result = onnx_parity_gate(wrapper, ids, tmp_path / "model.onnx", rtol=1e-4, atol=1e-5)
    assert result.passed, result.reason
    assert f"batch of {len(TEXTS)} (exported with batch {EXPORT_BATCH})" in result.reason
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # self-contained: no external-data file
    (declared,) = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).get_inputs()
    assert (declared.name, declared.type, declared.shape[1]) == (INPUT_NAME, "tensor(int64)", LENGTH)
    assert not isinstance(declared.shape[0], int)  # the batch dimension is symbolic


def _data(tokenizer, n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    texts = [TEXTS[int(i)] for i in torch.randint(0, len(TEXTS), (n,), generator=g)]
    return TensorDataset(encode(tokenizer, texts, LENGTH), torch.randint(0, 3, (n,), generator=g))


LAST_LAYER_AND_HEAD = ["model.bert.encoder.layer.1.", "model.bert.pooler.", "model.classifier."]


@pytest.mark.parametrize(("method", "param_filter"), [("graddot", None), ("ekfac", LAST_LAYER_AND_HEAD)],
                         ids=["graddot-all-parameters", "ekfac-last-layer"])
def test_influence_runs_on_the_vmap_path_and_agrees_with_the_batched_path(bert, method, param_filter):
    from audit.influence import InfluenceConfig, compute_influence

    wrapper, tokenizer = bert
    train, queries = _data(tokenizer, 12, seed=0), _data(tokenizer, 3, seed=1)
    results = {mode: compute_influence(wrapper, train, queries, InfluenceConfig(method=method, batch_size=5,
                                                                                 grad_mode=mode),
                                       progress=False, param_filter=param_filter)
               for mode in ("auto", "batched")}
    fast, slow = results["auto"], results["batched"]
    assert (fast.gradient_path, slow.gradient_path) == ("vmap", "batched")
    assert fast.scores.shape == (3, 12) and torch.isfinite(fast.scores).all() and fast.scores.abs().max() > 0
    torch.testing.assert_close(fast.scores, slow.scores, rtol=1e-4, atol=1e-4 * slow.scores.abs().max().item())


def test_a_param_filter_restricts_self_influence_to_the_selected_layers(bert):
    from audit.influence import InfluenceConfig, compute_influence
    from audit.influence.params import select_params

    wrapper, tokenizer = bert
    train = _data(tokenizer, 10, seed=2)
    kept = select_params(wrapper, LAST_LAYER_AND_HEAD)
    everything = select_params(wrapper)
    assert 0 < kept.dim < everything.dim
    assert all(name.startswith(tuple(LAST_LAYER_AND_HEAD)) for name in kept.names)
    own = compute_influence(wrapper, train, None, InfluenceConfig(method="ekfac"), progress=False,
                            param_filter=LAST_LAYER_AND_HEAD)
    assert own.gradient_path == "vmap"
    assert own.scores.shape == (10,) and torch.isfinite(own.scores).all() and (own.scores > 0).all()
    full = compute_influence(wrapper, train, None, InfluenceConfig(method="ekfac"), progress=False)
    assert not torch.allclose(own.scores, full.scores)  # the filter changed what was scored


def test_predictions_leave_each_submodule_in_its_own_mode(bert):
    # A new TextClassifier is in train mode around an eval-mode transformers model; predicting must
    # not push the wrapper's mode down (dropout on in later passes that do not set eval themselves).
    from audit.training import predict_logits

    model, tokenizer = bert
    model.train()
    model.model.eval()
    logits = predict_logits(model, _ids(tokenizer))
    assert model.training and not any(m.training for m in model.model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(_ids(tokenizer)), logits)  # no dropout: the same logits again
    model.eval()
