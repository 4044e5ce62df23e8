"""TracIn-CP over logged checkpoints: sum_k lr_k * graddot at checkpoint k."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from audit.errors import InvalidInput
from audit.influence import influence_scores, self_influence


def test_tracin_sums_learning_rate_weighted_gradient_products(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g))
    queries = TensorDataset(data.tensors[0][:3], data.tensors[1][:3])
    first = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data.tensors[0]), data.tensors[1]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    second = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(first, tmp_path / "epoch0.pt")
    current = {k: v.clone() for k, v in model.state_dict().items()}

    def graddot_at(state):
        probe = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        probe.load_state_dict(state)
        return influence_scores(probe, data, queries, method="graddot", progress=False), self_influence(
            probe, data, method="graddot", progress=False
        )

    (s1, o1), (s2, o2) = graddot_at(first), graddot_at(second)
    checkpoints = [(tmp_path / "epoch0.pt", 0.5), (second, 0.25)]
    scores = influence_scores(model, data, queries, method="tracin", checkpoints=checkpoints, progress=False)
    torch.testing.assert_close(scores, 0.5 * s1 + 0.25 * s2)
    own = self_influence(model, data, method="tracin", checkpoints=checkpoints, progress=False)
    torch.testing.assert_close(own, 0.5 * o1 + 0.25 * o2)
    assert (s1 - s2).abs().max() > 1e-3  # the checkpoints really differ
    for k, v in model.state_dict().items():  # the model keeps its own parameters
        assert torch.equal(v, current[k])


def test_tracin_refuses_missing_or_foreign_checkpoints(tmp_path):
    model = nn.Linear(4, 3).double()
    data = TensorDataset(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    with pytest.raises(InvalidInput, match="checkpoints"):
        self_influence(model, data, method="tracin", progress=False)
    with pytest.raises(InvalidInput, match="does not exist"):
        self_influence(model, data, method="tracin", checkpoints=[tmp_path / "missing.pt"], progress=False)
    with pytest.raises(InvalidInput, match="shape"):
        self_influence(model, data, method="tracin", checkpoints=[nn.Linear(5, 3).state_dict()], progress=False)
    with pytest.raises(InvalidInput, match="learning rates"):
        self_influence(model, data, method="tracin", checkpoints=[(model.state_dict(), 0.0)], progress=False)
