"""repair_batch, repair_per_query, the baselines and influence_horizon on a tiny seeded digits CNN.

The model is trained for half the default epochs (about 4 s on one core): still 94% accurate on
validation, with 17 mispredictions on the production split to flag.
"""

import dataclasses

import pytest
import torch

from audit.correction import PER_QUERY_CONFIG, CorrectionConfig, influence_horizon, repair_batch, repair_per_query
from audit.demo.digits import load_digits_splits
from audit.demo.models import SmallResNet
from audit.errors import InvalidInput
from audit.examples import ExampleTable
from audit.influence import influence_scores
from audit.training import TrainConfig, predict_logits, train
from bench.baselines import repair_flagged_finetune, repair_random


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    splits = load_digits_splits(0.1, seed=0)
    torch.manual_seed(0)
    model = SmallResNet()
    train(model, splits.train.dataset(), TrainConfig(epochs=20, seed=0))
    predicted = predict_logits(model, splits.production.inputs).argmax(dim=1)
    wrong = (predicted != splits.production.labels).nonzero().flatten().numpy()
    flagged = splits.production.subset(wrong)  # reviewer labels = true labels
    scores = influence_scores(model, splits.train.dataset(), flagged.dataset(), method="graddot", progress=False)
    return model, splits.train, flagged, scores


def _fixed(model, flagged):
    return (predict_logits(model, flagged.inputs).argmax(dim=1) == flagged.labels).float().mean().item()


def _reviewer_logprob(model, flagged):
    logp = predict_logits(model, flagged.inputs).log_softmax(dim=1)  # [Q, C]
    return logp[torch.arange(len(flagged)), flagged.labels]  # [Q]


def test_fixture_flags_enough_mispredictions(setup):
    _, _, flagged, scores = setup
    # how many it flags depends on the training trajectory (CPU, threads); the tests need a handful
    assert len(flagged) >= 8 and scores.shape == (len(flagged), 1078)


def test_repair_batch_repairs_a_copy_and_never_trains_on_flagged_examples(setup):
    model, train_table, flagged, scores = setup
    # slip one flagged example into the training set: it must never be selected or replayed
    leaked = ExampleTable(train_table.ids + flagged.ids[:1], torch.cat([train_table.inputs, flagged.inputs[:1]]),
                          torch.cat([train_table.labels, predict_logits(model, flagged.inputs[:1]).argmax(1)]))
    leaked_scores = torch.cat([scores, torch.full((len(flagged), 1), 1e6)], dim=1)  # the most helpful
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reinforced = repair_batch(model, leaked, flagged, CorrectionConfig(strategy="reinforce"), leaked_scores)
    assert reinforced.selected_ids and flagged.ids[0] not in reinforced.selected_ids
    result = repair_batch(model, leaked, flagged, CorrectionConfig(), -leaked_scores.abs())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.model is not model
    assert flagged.ids[0] not in result.selected_ids and flagged.ids[0] not in result.relabels
    assert set(result.relabels) <= set(result.selected_ids) and result.relabels
    assert 1 <= result.rounds <= CorrectionConfig().rounds == len(result.history)
    assert result.steps_taken <= sum(h["steps"] for h in result.history)
    assert max(h["fixed_fraction"] for h in result.history) == pytest.approx(_fixed(result.model, flagged))
    assert _fixed(result.model, flagged) > _fixed(model, flagged) == 0.0


def test_repair_batch_is_deterministic_and_stops_at_the_target(setup):
    model, train_table, flagged, scores = setup
    first = repair_batch(model, train_table, flagged, CorrectionConfig(), scores)
    again = repair_batch(model, train_table, flagged, CorrectionConfig(), scores)
    assert first.selected_ids == again.selected_ids and first.relabels == again.relabels
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), again.model.parameters(), strict=True))
    reached = first.history[0]["fixed_fraction"]
    assert reached > 0
    early = repair_batch(model, train_table, flagged, CorrectionConfig(target_fix_rate=reached), scores)
    assert early.rounds == 1 and early.steps_taken == CorrectionConfig().steps


@pytest.mark.parametrize("strategy", ["reinforce", "relabel", "unlearn"])
def test_every_strategy_raises_the_reviewer_label_probability(setup, strategy):
    model, train_table, flagged, scores = setup
    result = repair_batch(model, train_table, flagged, CorrectionConfig(strategy=strategy), scores)
    gain = _reviewer_logprob(result.model, flagged) - _reviewer_logprob(model, flagged)  # [Q]
    assert gain.mean() > 0.1
    assert (result.relabels != {}) == (strategy == "relabel")


def test_repair_batch_rejects_mismatched_scores_and_empty_batches(setup):
    model, train_table, flagged, scores = setup
    with pytest.raises(InvalidInput):
        repair_batch(model, train_table, flagged, CorrectionConfig(), scores[:, :10])
    with pytest.raises(InvalidInput):
        repair_batch(model, train_table, flagged.subset([]), CorrectionConfig())


def test_repair_per_query_repairs_each_query_and_beats_random_examples(setup):
    model, train_table, flagged, scores = setup
    config = dataclasses.replace(PER_QUERY_CONFIG, replay_size=64, steps=5, rounds=2)  # lighter than the default
    results = repair_per_query(model, train_table, flagged, config, scores)
    randoms = repair_random(model, train_table, flagged, config, per_query=True)
    assert len(results) == len(randoms) == len(flagged)
    gains, random_gains = [], []
    for q, (result, rand) in enumerate(zip(results, randoms, strict=True)):
        query = flagged.subset([q])
        assert not set(flagged.ids) & set(result.selected_ids + rand.selected_ids)
        gains.append((_reviewer_logprob(result.model, query) - _reviewer_logprob(model, query)).item())
        random_gains.append((_reviewer_logprob(rand.model, query) - _reviewer_logprob(model, query)).item())
    fixed = sum(_fixed(r.model, flagged.subset([q])) for q, r in enumerate(results))
    random_fixed = sum(_fixed(r.model, flagged.subset([q])) for q, r in enumerate(randoms))
    assert sum(g > 0 for g in gains) >= 11
    assert sum(gains) > 3 * max(sum(random_gains), 0.0) and fixed > random_fixed


def test_flagged_finetune_upper_bound_fixes_most_of_the_batch(setup):
    model, train_table, flagged, _ = setup
    result = repair_flagged_finetune(model, train_table, flagged, CorrectionConfig())
    assert result.selected_ids == () and _fixed(result.model, flagged) >= 0.75


def test_flagged_finetune_per_query_stops_when_fixed_and_keeps_the_input_model_otherwise(setup):
    model, train_table, flagged, _ = setup
    config = dataclasses.replace(PER_QUERY_CONFIG, replay_size=64, rounds=4)
    results = repair_flagged_finetune(model, train_table, flagged, config, per_query=True)
    assert len(results) == len(flagged)
    fixed = [_fixed(r.model, flagged.subset([q])) for q, r in enumerate(results)]
    for result, ok in zip(results, fixed, strict=True):
        assert 1 <= result.rounds <= config.rounds
        if ok:  # stopped after the first round that fixed it
            assert result.history[-1]["fixed_fraction"] == 1.0 and result.steps_taken == result.rounds * config.steps
            assert all(h["fixed_fraction"] < 1.0 for h in result.history[:-1])
        else:
            assert result.rounds == config.rounds and result.steps_taken == 0
            assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(),
                                                         model.state_dict().values(), strict=True))
    assert sum(fixed) >= len(flagged) // 2


def test_influence_horizon_is_first_order_exact_for_one_small_step(setup):
    model, train_table, flagged, scores = setup
    config = CorrectionConfig(k=10, lr=1e-4, optimizer="sgd")
    frame = influence_horizon(model, train_table, flagged, config, steps=(1, 4, 16), scores=scores, max_queries=6)
    assert list(frame.columns) == ["steps", "pearson", "spearman", "n_pairs"]
    assert list(frame["steps"]) == [1, 4, 16] and set(frame["n_pairs"]) == {18}
    # grad-dot scores are exactly the first-order loss change of one SGD step on the subset
    assert frame["pearson"].iloc[0] > 0.95 and frame["spearman"].iloc[0] > 0.8
