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
