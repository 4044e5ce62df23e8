"""A tiny random-init BERT (transformers BertConfig, no download) with padded dict batches:
finite scores, batched equal to unbatched, invariant to extra padding, for every method family."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from audit.influence import influence_scores, self_influence

METHODS = [("graddot", {}), ("ekfac", {}), ("kfac", {}), ("arnoldi", {"rank": 4, "iterations": 8})]


class Texts(Dataset):
    """Random token sequences of lengths 3..9; `pad_to` pre-pads every item with masked zeros."""

    def __init__(self, n: int, seed: int, pad_to: int | None = None):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, 10, (n,), generator=g)
        self.ids = [torch.randint(1, 40, (int(k),), generator=g) for k in lengths]
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.pad_to = pad_to

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        ids = self.ids[i]
        mask = torch.ones_like(ids)
        if self.pad_to is not None:
            extra = self.pad_to - len(ids)
            ids, mask = torch.cat([ids, ids.new_zeros(extra)]), torch.cat([mask, mask.new_zeros(extra)])
        return {"input_ids": ids, "attention_mask": mask}, self.labels[i]


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=24, num_labels=3,
    )
    return BertForSequenceClassification(config).double()  # dropout on: the engine must switch it off


@pytest.mark.parametrize(("method", "options"), METHODS, ids=[m for m, _ in METHODS])
def test_bert_scores_are_finite_batch_and_padding_invariant(bert, method, options):
    train, queries = Texts(20, seed=0), Texts(3, seed=1)
    batched = influence_scores(bert, train, queries, method=method, batch_size=8, progress=False, **options)
    assert batched.shape == (3, 20)
    assert torch.isfinite(batched).all() and batched.abs().max() > 0
    tol = dict(rtol=1e-8, atol=1e-8 * batched.abs().max().item())
    unbatched = influence_scores(bert, train, queries, method=method, batch_size=1, progress=False, **options)
    torch.testing.assert_close(unbatched, batched, **tol)
    padded = influence_scores(
        bert, Texts(20, seed=0, pad_to=16), Texts(3, seed=1, pad_to=16), method=method, batch_size=8,
        progress=False, **options,
    )
    torch.testing.assert_close(padded, batched, **tol)
    own = self_influence(bert, train, method=method, batch_size=8, progress=False, **options)
    assert own.shape == (20,) and torch.isfinite(own).all() and (own > 0).all()
    assert bert.training  # the user's mode is restored


def _gradient_function(model, mode: str):
    from audit.influence.gradients import GradientFunction
    from audit.influence.params import model_state, select_params

    space = select_params(model)
    selected, frozen = model_state(model, space, torch.device("cpu"))
    return GradientFunction(model, space, selected, frozen, mode=mode)


def _padded_batch(n: int = 6):
    from audit.influence.batches import collate

    data = Texts(n, seed=2)
    return collate([data[i] for i in range(n)])


def test_bert_runs_under_vmap_with_a_4d_attention_bias_and_matches_the_batched_path(bert):
    inputs, labels = _padded_batch()
    assert (inputs["attention_mask"] == 0).any()  # the batch really is padded
    bert.eval()
    auto = _gradient_function(bert, "auto")
    fast = auto.loss_grads(inputs, labels)
    assert auto.path == "vmap (4-D attention bias)"
    slow = _gradient_function(bert, "batched").loss_grads(inputs, labels)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-12)
    bert.train()


class MaskPooling(torch.nn.Module):
    """Reads its 2-D mask itself (mean pooling, a data-dependent branch): a 4-D bias would change
    its logits, so the engine must not rewrite the mask and must fall back to the batched path."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(40, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        if bool(attention_mask.all()):  # vmap refuses this branch
            pooled = h.mean(dim=1)
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(dim=1) / m.sum(dim=1)
        return self.head(torch.tanh(pooled))


def test_model_reading_its_own_mask_falls_back_to_the_batched_path_with_correct_gradients():
    torch.manual_seed(0)
    model = MaskPooling().double()
    inputs, labels = _padded_batch()
    fn = _gradient_function(model, "auto")
    grads = fn.loss_grads(inputs, labels)
    assert fn.path == "batched"
    rows = []
    for i in range(len(labels)):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        loss = torch.nn.functional.cross_entropy(model(**one), labels[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    torch.testing.assert_close(grads, torch.stack(rows), rtol=1e-9, atol=1e-12)
    with pytest.raises(Exception, match="cannot run under torch.func.vmap"):
        _gradient_function(model, "vmap").loss_grads(inputs, labels)
