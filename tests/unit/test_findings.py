import torch

from audit.examples import ExampleTable
from audit.findings import influence_table, self_influence_table


def _tables():
    train = ExampleTable(("t0", "t1", "t2", "t3"), torch.zeros(4, 2), torch.tensor([0, 1, 1, 2]))
    flagged = ExampleTable(("q0", "q1"), torch.zeros(2, 2), torch.tensor([2, 0]))
    return train, flagged


def test_influence_table_ranks_helpful_by_largest_and_harmful_by_most_negative_score():
    train, flagged = _tables()
    scores = torch.tensor([[0.5, -2.0, 3.0, -0.1], [-1.0, 4.0, 0.2, -3.0]])  # [Q=2, N=4]
    table = influence_table(scores, flagged, torch.tensor([1, 1]), train, k=2)
    q0 = table[table.query_id == "q0"]
    assert list(q0[q0.role == "helpful"].train_id) == ["t2", "t0"]
    assert list(q0[q0.role == "harmful"].train_id) == ["t1", "t3"]
    assert list(q0[q0.role == "harmful"]["rank"]) == [1, 2]
    row = table[(table.query_id == "q1") & (table.role == "harmful") & (table["rank"] == 1)].iloc[0]
    assert (row.train_id, row.score, row.train_label, row.query_label, row.predicted_label) == ("t3", -3.0, 2, 0, 1)


def test_self_influence_table_is_sorted_most_unusual_first():
    train, _ = _tables()
    table = self_influence_table(torch.tensor([0.1, 5.0, 0.3, 2.0]), train)
    assert list(table.train_id) == ["t1", "t3", "t2", "t0"]
    assert list(table["rank"]) == [1, 2, 3, 4]


def test_findings_from_blocks_of_flagged_rows_equal_those_from_the_whole_matrix():
    # An audit against the gradient index hands its scores over a few flagged rows at a time; the
    # tables, the suspects and the report's top examples must not depend on the block size.
    import pandas as pd
    from torch import nn

    from audit.examples import ExampleTable
    from audit.findings import build_findings
    from audit.scoring import ScoreBlocks

    g = torch.Generator().manual_seed(0)
    train = ExampleTable(tuple(f"t{i}" for i in range(30)), torch.rand(30, 4, generator=g), torch.arange(30) % 3)
    flagged = ExampleTable(tuple(f"q{i}" for i in range(7)), torch.rand(7, 4, generator=g), torch.arange(7) % 3)
    predicted = (flagged.labels + 1) % 3
    predicted[2] = flagged.labels[2]  # one flagged example the model already gets right: no relabel evidence
    scores = torch.randn(7, 30, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    whole = build_findings(model, "m", "1", "graddot", train, flagged, predicted, scores, scores.abs().sum(0), 4)
    blocks = ScoreBlocks(7, 30, lambda start, stop: scores[start:stop].clone(), rows_per_block=2)
    parts = build_findings(model, "m", "1", "graddot", train, flagged, predicted, blocks, scores.abs().sum(0), 4)
    pd.testing.assert_frame_equal(parts.influence, whole.influence)
    pd.testing.assert_frame_equal(parts.candidates, whole.candidates)
    assert len(whole.candidates) > 0 and (whole.candidates.action != "review").any()
    for field in ("proponents", "opponents", "proponent_scores", "opponent_scores"):
        assert torch.equal(getattr(parts.top, field), getattr(whole.top, field))
