"""Queries are scored `query_block` at a time: the same scores for every block size, at most that
many query rows between two passes over the training data, and one pass when Q <= query_block."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from audit.errors import InvalidInput
from audit.influence import InfluenceConfig, compute_influence
from tests.unit.influence_helpers import tiny_data, tiny_mlp

N_TRAIN, N_QUERIES = 10, 7


class Logged(Dataset):
    """`base` that appends (tag, index) to a shared log on every item read."""

    def __init__(self, base: Dataset, tag: str, log: list[tuple[str, int]]):
        self.base, self.tag, self.log = base, tag, log

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.log.append((self.tag, int(i)))
        return self.base[i]


def _reads(log: list[tuple[str, int]]) -> tuple[int, int]:
    """(complete passes over the training data, most distinct query rows read between two passes).
    A pass ends when the last training example is read; queries read since then are the ones whose
    gradients the next pass scores, so they bound the query gradients alive at once."""
    passes, since, most = 0, set(), 0
    for tag, i in log:
        if tag == "query":
            since.add(i)
            most = max(most, len(since))
        elif i == N_TRAIN - 1:
            passes, since = passes + 1, set()
    return passes, most


def _scores(method: str, block: int, log: list | None = None, **options) -> torch.Tensor:
    train, queries = tiny_data(N_TRAIN, seed=1), tiny_data(N_QUERIES, seed=2)
    if log is not None:
        train, queries = Logged(train, "train", log), Logged(queries, "query", log)
    checkpoints = [(tiny_mlp(3).state_dict(), 0.5), (tiny_mlp(4).state_dict(), 0.25)] if method == "tracin" else None
    config = InfluenceConfig(method=method, query_block=block, batch_size=4, **options)
    return compute_influence(tiny_mlp(), train, queries, config, progress=False, checkpoints=checkpoints).scores


@pytest.mark.parametrize(("method", "options"), [("graddot", {}), ("gradcos", {}), ("ekfac", {}),
                                                 ("arnoldi", {"rank": 8}), ("tracin", {})])
def test_every_block_size_gives_the_unblocked_scores(method, options):
    unblocked = _scores(method, 512, **options)
    assert unblocked.shape == (N_QUERIES, N_TRAIN)
    for block in (1, 3, N_QUERIES, N_QUERIES + 5):
        torch.testing.assert_close(_scores(method, block, **options), unblocked,
                                   rtol=1e-10, atol=1e-12 * unblocked.abs().max().item())


def test_blocked_graddot_equals_its_formula():
    model, train, queries = tiny_mlp(), tiny_data(N_TRAIN, seed=1), tiny_data(N_QUERIES, seed=2)

    def grads(data):
        x, y = data.tensors
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))])
            for i in range(len(y))]
        return torch.stack(rows)

    expected = grads(queries) @ grads(train).T
    torch.testing.assert_close(_scores("graddot", 3), expected, rtol=1e-10, atol=1e-12 * expected.abs().max().item())


@pytest.mark.parametrize("method", ["graddot", "ekfac"])
def test_query_rows_alive_at_once_are_bounded_by_the_block(method):
    log: list[tuple[str, int]] = []
    _scores(method, N_QUERIES, log)
    passes_one_block, most = _reads(log)
    assert most == N_QUERIES
    for block in (1, 3, N_QUERIES, N_QUERIES + 5):
        log.clear()
        _scores(method, block, log)
        passes, most = _reads(log)
        assert most <= block
        # one more training pass per extra block, and a single one when Q <= block (as before blocks)
        assert passes - passes_one_block == math.ceil(N_QUERIES / block) - 1
    if method == "graddot":  # no curvature to fit: the scoring passes are all there is
        assert passes_one_block == 1


def test_query_block_is_validated_and_shares_the_curvature_cache(tmp_path):
    for bad in (0, 2.5):
        with pytest.raises(InvalidInput, match="query_block must be an integer >= 1"):
            InfluenceConfig(query_block=bad)
    model, train, queries = tiny_mlp(), tiny_data(N_TRAIN, seed=1), tiny_data(N_QUERIES, seed=2)
    small = compute_influence(model, train, queries, InfluenceConfig(query_block=2), cache_dir=tmp_path, progress=False)
    large = compute_influence(model, train, queries, InfluenceConfig(), cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("curvature-ekfac-*.pt"))) == 1  # one fitted curvature serves every block size
    torch.testing.assert_close(small.scores, large.scores, rtol=1e-10, atol=1e-12 * large.scores.abs().max().item())
