"""audit.frozen_features: a model whose trainable parameters all sit in its head is split into
frozen features computed once and the head; the head on the features is the model, repairing the
head is repairing the model, and any other model is left whole."""

import copy

import pytest
import torch
from torch import nn

from audit.correction import finetune_steps
from audit.examples import ExampleTable
from audit.frozen_features import split_frozen
from audit.influence import influence_scores, self_influence
from audit.scoring import score_flagged
from audit.text_classifier import TextClassifier
from tests.unit.influence_helpers import tiny_mlp


def _table(inputs: torch.Tensor, labels: torch.Tensor) -> ExampleTable:
    return ExampleTable(tuple(f"e{i}" for i in range(len(inputs))), inputs, labels)


def _mlp_with_trainable_last_layer() -> nn.Module:
    model = tiny_mlp()
    model[0].requires_grad_(False)
    return model


def _text_classifier(tuned: int | None = 0) -> tuple[TextClassifier, torch.Tensor, torch.Tensor]:
    """Tiny BERT with only the pooler and classifier trainable (`tuned` = 0 top layers; None: all),
    and 40 sentences of different lengths (padding trimmed per batch when features are computed)."""
    from audit.demo.text_models import freeze_bottom
    from tests.text_helpers import WORDS, encode, tiny_bert

    bert, tokenizer = tiny_bert()
    model = TextClassifier(bert, tokenizer.pad_token_id).eval()
    if tuned is not None:
        freeze_bottom(model, tuned)
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(2, 12, (40,), generator=g)]
    return model, encode(tokenizer, texts, 16), torch.randint(0, 2, (40,), generator=g)


def test_a_trainable_last_layer_is_the_head_and_its_input_the_features():
    model = _mlp_with_trainable_last_layer()
    x = torch.randn(30, 4, dtype=torch.float64)
    frozen = split_frozen(model, x)
    assert frozen.is_split and frozen.head is model[2]
    features = frozen.features(x)
    assert features.shape == (30, 5)
    torch.testing.assert_close(frozen.head(features), model(x))


def test_a_bert_classifier_tuned_at_pooler_and_classifier_splits_at_the_first_token():
    model, ids, _ = _text_classifier()
    frozen = split_frozen(model, ids)
    assert frozen.is_split and "pooler" in frozen.description
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in frozen.head.parameters()}
    features = frozen.features(ids)
    assert features.shape == (40, 32)
    torch.testing.assert_close(frozen.head(features), model(ids), rtol=1e-5, atol=1e-5)


def test_a_torchvision_classifier_tuned_at_fc_splits_at_the_pooled_features():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=3).eval()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("fc."))
    x = torch.randn(10, 3, 32, 32)
    frozen = split_frozen(model, x)
    assert frozen.is_split and frozen.head is model.fc
    torch.testing.assert_close(frozen.head(frozen.features(x)), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["all trainable", "first layer trainable", "bert top layer trainable"])
def test_a_model_without_a_trainable_head_is_left_whole(case):
    if case == "bert top layer trainable":
        model, x, labels = _text_classifier(tuned=1)
    else:
        model, x = tiny_mlp(), torch.randn(12, 4, dtype=torch.float64)
        labels = torch.zeros(12, dtype=torch.int64)
        if case == "first layer trainable":
            model[2].requires_grad_(False)  # its output is no logits: no head holds the trainable part
    frozen = split_frozen(model, x)
    table = _table(x, labels)
    assert not frozen.is_split and frozen.head is model
    assert frozen.table(table) is table and frozen.full_model(model) is model


def test_repairing_the_head_on_its_features_is_repairing_the_model():
    model = _mlp_with_trainable_last_layer()
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
    frozen = split_frozen(model, x)
    head = copy.deepcopy(frozen.head)
    finetune_steps(head, frozen.features(x), y, steps=5, lr=0.5, optimizer="sgd")
    repaired = frozen.full_model(head)

    whole = copy.deepcopy(model)
    finetune_steps(whole, x, y, steps=5, lr=0.5, optimizer="sgd")
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(repaired.state_dict()[key], value)
    assert not torch.equal(repaired[2].weight, model[2].weight)  # the steps moved the head
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])  # the input model is never modified


def test_audit_scores_of_a_frozen_bert_are_the_whole_models_scores(tmp_path):
    model, ids, labels = _text_classifier()
    train, flagged = _table(ids[:32], labels[:32]), _table(ids[32:], 1 - labels[32:])
    scored = score_flagged(model, train, flagged, "graddot", tmp_path)
    whole = influence_scores(model, train.dataset(), flagged.dataset(), method="graddot", progress=False)
    blocks = torch.cat([block for _, block in scored.scores])
    torch.testing.assert_close(blocks, whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())
    self_whole = self_influence(model, train.dataset(), method="graddot", progress=False)
    torch.testing.assert_close(scored.self_scores, self_whole, rtol=1e-4, atol=1e-4 * self_whole.abs().max().item())
