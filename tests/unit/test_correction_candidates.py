"""propose_corrections and its label rule, on hand-made scores where the answer is known."""

import pandas as pd
import pytest
import torch

from audit.correction import propose_corrections
from audit.correction.candidates import COLUMNS, Evidence, propose_label
from audit.errors import InvalidInput
from audit.examples import ExampleTable


def _table(labels, prefix):
    labels = torch.tensor(labels)
    return ExampleTable(tuple(f"{prefix}{i}" for i in range(len(labels))), torch.zeros(len(labels), 2), labels)


def _probs(rows):
    return torch.tensor(rows, dtype=torch.float32)


TRAIN = _table([1, 1, 0, 1, 2, 1], "t")  # current labels
FLAGGED = _table([0, 2], "q")  # reviewer labels
PREDICTED = torch.tensor([1, 1])  # both wrongly predicted as 1
SCORES = torch.tensor([
    [-5.0, -1.0, -9.0, 0.5, -3.0, -2.0],  # query 0: t2 most harmful but labelled 0, not the prediction
    [-0.5, -4.0, 1.0, -3.0, 0.0, 2.0],
])


def test_relabel_rows_pick_harmful_examples_labelled_as_the_wrong_prediction():
    frame = propose_corrections(SCORES, TRAIN, FLAGGED, PREDICTED, None, k=2)
    assert list(frame.columns) == COLUMNS
    assert set(frame["action"]) == {"relabel"}
    # query 0: t0 (-5), t5 (-2); query 1: t1 (-4), t3 (-3); t2/t4 are not labelled 1
    assert sorted(frame["train_id"]) == ["t0", "t1", "t3", "t5"]
    row = frame.set_index("train_id").loc["t0"]
    assert row["current_label"] == 1 and row["proposed_label"] == 0  # reviewer's label of q0
    assert row["evidence_queries"] == ["q0"] and row["evidence_scores"] == [-5.0]
    assert row["evidence_ranks"] == [2]  # t2 (-9) ranks first among all examples
    assert frame["train_id"].iloc[0] == "t0"  # most harmful first
    assert frame["proposed_label"].dtype == pd.Int64Dtype()
    assert all(isinstance(r, str) and r.endswith(".") for r in frame["reason"])


def test_examples_harmful_to_several_queries_collect_all_evidence():
    frame = propose_corrections(SCORES, TRAIN, FLAGGED, PREDICTED, None, k=4).set_index("train_id")
    assert frame.loc["t1", "evidence_queries"] == ["q1", "q0"]  # ordered by score: -4 then -1
    assert frame.loc["t1", "proposed_label"] == 2  # q1's evidence weighs more


def test_correctly_predicted_queries_give_no_evidence():
    predicted = torch.tensor([0, 1])  # query 0 is right
    frame = propose_corrections(SCORES, TRAIN, FLAGGED, predicted, None, k=2)
    assert all(q == ["q1"] for q in frame["evidence_queries"])


def test_model_probabilities_decide_the_label_or_remove_the_example():
    probs = _probs([
        [0.05, 0.05, 0.9],  # t0: model confidently says 2 -> beats the reviewer's 0
        [0.1, 0.1, 0.8], [0.8, 0.1, 0.1],
        [0.4, 0.3, 0.3],  # t3: unsure, predicts 0, reviewer says 2 -> no plausible label
        [0.0, 0.0, 1.0],
        [0.1, 0.9, 0.0],  # t5: fits its label 1 confidently -> a human should look
    ])
    frame = propose_corrections(SCORES, TRAIN, FLAGGED, PREDICTED, None, k=2, train_probs=probs).set_index("train_id")
    assert frame.loc["t0", "proposed_label"] == 2 and frame.loc["t0", "action"] == "relabel"
    assert frame.loc["t3", "action"] == "remove" and pd.isna(frame.loc["t3", "proposed_label"])
    assert frame.loc["t5", "action"] == "review" and pd.isna(frame.loc["t5", "proposed_label"])
    assert frame.loc["t5", "evidence_queries"] == ["q0"]


def test_propose_label_prefers_the_reviewer_when_the_model_agrees_or_has_no_say():
    evidence = [Evidence(0, -1.0, 1)]
    reviewer = torch.tensor([3])
    assert propose_label(evidence, reviewer, 1, None, 0.5)[0] == 3
    assert propose_label(evidence, reviewer, 1, _probs([0.1, 0.3, 0.2, 0.4]), 0.5)[0] == 3
    assert propose_label(evidence, reviewer, 1, _probs([0.1, 0.1, 0.7, 0.1]), 0.5)[0] == 2
    assert propose_label(evidence, reviewer, 1, _probs([0.1, 0.1, 0.7, 0.1]), 0.8)[0] is None


def test_extreme_self_influence_becomes_review_rows():
    self_scores = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 40.0])
    frame = propose_corrections(SCORES, TRAIN, FLAGGED, torch.tensor([0, 2]), self_scores, k=2)
    assert list(frame["action"]) == ["review"] and list(frame["train_id"]) == ["t5"]
    assert frame["evidence_queries"].iloc[0] == [] and "Self-influence" in frame["reason"].iloc[0]
    # a relabel candidate is not listed twice
    both = propose_corrections(SCORES, TRAIN, FLAGGED, PREDICTED, self_scores, k=2)
    assert list(both["train_id"]).count("t5") == 1


def test_shape_mismatches_raise_invalid_input():
    with pytest.raises(InvalidInput):
        propose_corrections(SCORES[:, :3], TRAIN, FLAGGED, PREDICTED, None)
    with pytest.raises(InvalidInput):
        propose_corrections(SCORES, TRAIN, FLAGGED, torch.tensor([1]), None)
    with pytest.raises(InvalidInput):
        propose_corrections(SCORES, TRAIN, FLAGGED, PREDICTED, torch.ones(3))


def test_unfiltered_random_plan_takes_each_querys_top_k_with_no_other_filter():
    from bench.baselines import unfiltered_plan

    scores = torch.tensor([[0.9, 0.1, 0.8, 0.7], [0.2, 0.95, 0.85, 0.1]])  # [Q=2, N=4]
    labels = torch.tensor([3, 3, 1, 2])
    eligible = torch.tensor([True, True, True, False])
    reviewer = torch.tensor([1, 2])
    args = (scores, labels, torch.tensor([3, 3]), reviewer, 2, eligible)
    assert set(unfiltered_plan("reinforce", *args).descend) == {0, 1, 2}  # position 3 is not eligible
    assert set(unfiltered_plan("unlearn", *args).ascend) == {0, 1, 2}
    relabel = unfiltered_plan("relabel", *args)
    # query 0 draws 0 and 2 (label 1 already its reviewer label: no edit), query 1 draws 1 (and 2, taken)
    assert relabel.relabels == {0: 1, 1: 2}
