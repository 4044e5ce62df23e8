"""The repair search: its selection split and its choice, on cases whose outcome holds by
construction (a near-zero learning rate changes no prediction; the flagged examples are the
model's own mispredictions, so doing nothing fixes none of them)."""

import dataclasses

import pytest
import torch
from torch import nn

from audit.correction import DEFAULT_CANDIDATES, CorrectionConfig, RepairCandidate, search_repairs, selection_split
from audit.demo.digits import load_digits_splits
from audit.errors import InvalidInput
from audit.gates import GateThresholds
from audit.training import TrainConfig, predict_logits, train

# lr 1e-9 moves no weight by more than ~1e-8: every prediction stays the champion's
NO_OP = RepairCandidate("no-op", CorrectionConfig(lr=1e-9, steps=1, rounds=1))
# Adam's first step moves every weight with a gradient by about the learning rate: at 1e30 the
# ReLU layer's outputs are ~1e30 and the next layer's products ~1e60, past float32's 3.4e38, so the
# outputs are not finite and the training diverges
WRECK = RepairCandidate("wreck", CorrectionConfig(lr=1e30, steps=10, rounds=1, reinforce_k=5))


@pytest.fixture(scope="module")
def setup():
    splits = load_digits_splits(0.1, seed=0)
    torch.manual_seed(0)
    # ReLU, not the tanh of DigitsMLP: a saturating activation would keep the wreck's outputs finite
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    train(model, splits.train.dataset(), TrainConfig(epochs=30, seed=0))
    predicted = predict_logits(model, splits.production.inputs).argmax(dim=1)
    wrong = (predicted != splits.production.labels).nonzero().flatten().numpy()
    assert len(wrong) > 0, "the fixture needs mispredictions to flag"
    selection, _ = selection_split(splits.validation, 1 / 3)
    return model, splits, splits.production.subset(wrong), selection


def test_selection_split_is_disjoint_stratified_and_independent_of_row_order(setup):
    _, splits, _, _ = setup
    validation = splits.validation
    selection, gate = selection_split(validation, 1 / 3)
    assert set(selection.ids).isdisjoint(gate.ids) and len(selection) + len(gate) == len(validation)
    for label in range(10):
        members = int((validation.labels == label).sum())
        assert int((selection.labels == label).sum()) == round(members / 3)
    shuffled = validation.subset(torch.randperm(len(validation), generator=torch.Generator().manual_seed(1)).numpy())
    assert set(selection_split(shuffled, 1 / 3)[0].ids) == set(selection.ids)
    with pytest.raises(InvalidInput, match="selection fraction must be in"):
        selection_split(validation, 1.0)
    with pytest.raises(InvalidInput, match="leaves one side empty"):
        selection_split(validation.subset([0]), 0.9)


def test_the_search_chooses_the_candidate_that_passes_and_says_why_the_other_failed(setup):
    model, splits, flagged, selection = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    thresholds = GateThresholds(min_fix_rate=0.0)
    result = search_repairs(model, splits.train, flagged, selection, 10, thresholds, (WRECK, NO_OP))
    assert [o.candidate.name for o in result.outcomes] == ["wreck", "no-op"]
    assert result.chosen_index == 1 and result.chosen.candidate.name == "no-op"
    wreck = result.outcomes[0].selection
    assert not wreck.passed and [g.name for g in wreck.failed] == ["stable_training"]
    assert result.outcomes[0].repair is None and "training diverged: " in wreck.failed[0].reason
    assert [g.name for g in result.outcomes[1].selection.results] == [
        "fix_rate", "heldout_accuracy", "class_recall", "canary_flips"]
    assert len(result.failures()) == 1 and result.failures()[0].startswith("wreck: ")
    table = result.table()
    assert list(table["candidate"]) == ["wreck", "no-op"] and list(table["chosen"]) == [False, True]
    assert list(table["passed"]) == [False, True] and "lower the learning rate" in table.loc[0, "failed_because"]
    assert list(table["label_edits"]) == [0, 0] and not table.loc[0, "stable_training_passed"]
    assert table.loc[1, "failed_because"] == "" and table.loc[1, "heldout_accuracy_passed"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input model is untouched


def test_when_no_candidate_passes_nothing_is_chosen_and_each_failure_is_named(setup):
    model, splits, flagged, selection = setup
    thresholds = GateThresholds(min_fix_rate=1.0)  # doing nothing fixes no misprediction
    result = search_repairs(model, splits.train, flagged, selection, 10, thresholds, (NO_OP,))
    assert result.chosen is None and result.chosen_index is None
    (failure,) = result.failures()
    assert failure.startswith("no-op: fix rate 0.00") and "is below the required 1.00" in failure


def test_candidates_keep_their_configs_but_take_the_step_budget_and_the_fix_rate_target(setup):
    model, splits, flagged, selection = setup
    result = search_repairs(model, splits.train, flagged, selection, 10, GateThresholds(min_fix_rate=0.25),
                            (NO_OP, dataclasses.replace(NO_OP, name="long", config=CorrectionConfig(
                                lr=1e-9, steps=50, rounds=1))), max_steps=4)
    steps = [o.candidate.config.steps for o in result.outcomes]
    assert steps == [1, 4] and {o.candidate.config.target_fix_rate for o in result.outcomes} == {0.25}
    with pytest.raises(InvalidInput, match="at least one candidate"):
        search_repairs(model, splits.train, flagged, selection, 10, GateThresholds(), ())


def test_default_candidates_have_distinct_names_and_valid_configs():
    names = [c.name for c in DEFAULT_CANDIDATES]
    assert len(names) == len(set(names)) >= 2
    assert all(isinstance(c.config, CorrectionConfig) for c in DEFAULT_CANDIDATES)


def test_the_report_tables_and_reasons_follow_the_search(setup):
    from audit.correction.report import correction_tables, failure_reasons

    model, splits, flagged, selection = setup
    chosen = search_repairs(model, splits.train, flagged, selection, 10, GateThresholds(min_fix_rate=0.0), (NO_OP,))
    tables = correction_tables(chosen)
    assert list(tables["candidates"]["candidate"]) == ["no-op"]
    assert len(tables["history"]) == chosen.chosen.repair.rounds
    assert list(tables["relabels"].columns) == ["train_id", "proposed_label"]
    none = search_repairs(model, splits.train, flagged, selection, 10, GateThresholds(min_fix_rate=1.0), (NO_OP,))
    assert len(correction_tables(none)["history"]) == 0 and len(correction_tables(none)["relabels"]) == 0
    (reason,) = failure_reasons(none, None)
    assert reason.startswith("no repair candidate passed the gates on the selection split (no-op: fix rate 0.00")


def test_the_search_draws_a_progress_bar_over_the_candidates_only_when_asked(setup, capfd):
    model, splits, flagged, selection = setup
    search_repairs(model, splits.train, flagged, selection, 10, GateThresholds(), (NO_OP,))
    assert "repair candidates" not in capfd.readouterr().err
    search_repairs(model, splits.train, flagged, selection, 10, GateThresholds(), (NO_OP,), progress=True)
    assert "repair candidates" in capfd.readouterr().err


def test_a_horizon_measured_with_diverging_steps_trusts_one_step_and_the_search_goes_on(setup):
    # the correct flow measures the horizon with the first candidate's settings: a first
    # candidate that diverges must cost that candidate, not the whole correction
    from audit.correction import influence_horizon, trusted_steps
    from audit.examples import ExampleTable

    model, splits, flagged, selection = setup
    train_table: ExampleTable = splits.train
    frame = influence_horizon(model, train_table, flagged, WRECK.config, steps=(1, 2, 4), max_queries=3)
    assert frame["pearson"].isna().all() and frame["spearman"].isna().all() and set(frame["n_pairs"]) == {9}
    budget = trusted_steps(frame, 0.5)
    assert budget == 1
    result = search_repairs(model, train_table, flagged, selection, 10, GateThresholds(min_fix_rate=0.0),
                            (WRECK, NO_OP), max_steps=budget)
    assert [o.candidate.name for o in result.outcomes] == ["wreck", "no-op"] and result.chosen.candidate.name == "no-op"
