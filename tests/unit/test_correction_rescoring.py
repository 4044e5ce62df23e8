"""Re-scoring between repair rounds (audit.correction.rescoring): a curvature method's curvature is
fitted once on the input model and reused by every round and every per-query repair; the index
scorer scores the repaired model's queries against rows built once for the input model.

A seeded, untrained 64 -> 16 -> 10 MLP on 240 digits keeps every case under a second. The flagged
examples get the class the model finds least likely as their reviewer label and the repairs take
one tiny step per round, so no repair fixes its query early: every round re-scores.
"""

import dataclasses

import pytest
import torch
from torch import nn

from audit.correction import INDEX, CorrectionConfig, index_scorer, repair_batch, repair_per_query
from audit.correction.rescoring import rescoring
from audit.demo.digits import load_digits_splits
from audit.errors import InvalidInput
from audit.examples import ExampleTable
from audit.influence import influence_scores
from audit.influence.index import IndexConfig, build_index
from audit.training import predict_logits
from tests.unit.influence_helpers import counted_fits

CONFIG = CorrectionConfig(strategy="reinforce", k=5, steps=1, lr=1e-6, replay_size=32, rounds=3)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    splits = load_digits_splits(0.1, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).eval()
    train = splits.train.subset(list(range(240)))
    production = splits.production.subset(list(range(4)))
    least_likely = predict_logits(model, production.inputs).argmin(dim=1)  # [4]
    flagged = ExampleTable(production.ids, production.inputs, least_likely)
    return model, train, flagged


@pytest.fixture
def counted_ekfac():
    """`counted_ekfac`: ekfac with its fit counted (the registered fit wrapped, nothing mocked)."""
    with counted_fits("ekfac") as fits:
        yield fits


def test_per_query_repairs_fit_the_curvature_once_for_every_round_and_query(setup, counted_ekfac):
    model, train, flagged = setup
    results = repair_per_query(model, train, flagged, dataclasses.replace(CONFIG, method="counted_ekfac"))
    assert len(results) == len(flagged)
    assert all(r.rounds == CONFIG.rounds for r in results)  # every query re-scored after each round
    assert counted_ekfac == [len(train)]


def test_batch_repair_fits_the_curvature_once_and_refits_only_with_a_callers_scorer(setup, counted_ekfac):
    from audit.correction import influence_scorer

    model, train, flagged = setup
    config = dataclasses.replace(CONFIG, method="counted_ekfac")
    assert repair_batch(model, train, flagged, config).rounds == CONFIG.rounds
    assert len(counted_ekfac) == 1
    # a scorer without a fitted curvature (the behaviour before reuse) fits at every round
    repair_batch(model, train, flagged, config, scorer=influence_scorer("counted_ekfac"))
    assert len(counted_ekfac) == 1 + CONFIG.rounds


@pytest.mark.parametrize("method", ["ekfac", "graddot"])
def test_round_zero_scores_with_the_reused_curvature_equal_influence_scores(setup, method):
    model, train, flagged = setup
    expected = influence_scores(model, train.dataset(), flagged.dataset(), method=method, progress=False)
    with rescoring(model, train, method) as scorer:
        assert torch.equal(scorer(model, train, flagged), expected)
        later = scorer(model, train, flagged.subset([1]))  # reused: a later round's query, in a smaller batch
    # float32 round-off of a different batch, relative to the scores' scale
    torch.testing.assert_close(later, expected[1:2], rtol=0, atol=1e-5 * expected.abs().max().item())


def test_index_scorer_round_zero_equals_index_scores_and_relabelled_rows_follow_their_label(setup, tmp_path):
    model, train, flagged = setup
    config = IndexConfig(rank_in=8, rank_out=8, fisher_samples=None)  # exact Fisher: label-free curvature
    index = build_index(model, train.dataset(), tmp_path / "a", config, progress=False)
    scorer = index_scorer(index, model, train)
    assert torch.equal(scorer(model, train, flagged), index.scores(model, flagged.dataset()))
    # relabel three rows: their columns are the rows an index of the relabelled set would store
    labels = train.labels.clone()
    labels[[3, 50, 200]] = (labels[[3, 50, 200]] + 1) % 10
    relabelled = ExampleTable(train.ids, train.inputs, labels)
    fresh = build_index(model, relabelled.dataset(), tmp_path / "b", config, progress=False)
    torch.testing.assert_close(scorer(model, relabelled, flagged), fresh.scores(model, flagged.dataset()),
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(InvalidInput, match="training rows"):
        index_scorer(index, model, train.subset(list(range(10))))


def test_index_method_builds_one_index_for_every_round_and_query(setup):
    model, train, flagged = setup
    config = dataclasses.replace(CONFIG, method=INDEX)
    results = repair_per_query(model, train, flagged, config)
    assert [r.rounds for r in results] == [CONFIG.rounds] * len(flagged)
    batch = repair_batch(model, train, flagged, config)
    assert batch.rounds == CONFIG.rounds
    assert all(torch.isfinite(p).all() for p in batch.model.parameters())


@pytest.mark.parametrize("method", ["tracin", "ekfac2", ""])
def test_a_method_the_correction_cannot_rescore_with_is_refused_in_one_sentence(method):
    with pytest.raises(InvalidInput) as info:
        CorrectionConfig(method=method)
    message = str(info.value)
    assert "method must be one of" in message and "'index'" in message and "'tracin'" not in message.split("got")[0]
    assert message.count(". ") == 0 and message.endswith(".")
