"""Exact re-ranking of the index's shortlist (audit.influence.index.rerank): with a shortlist that
holds everything it is the engine's top-k; with a short one, the engine's ranking of the index's
shortlists pooled over the queries; its curvature is fitted once per index and model and restored after."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset

from audit.errors import InvalidInput
from audit.influence import top_influences
from audit.influence.engine import compute
from audit.influence.index import IndexConfig, build_index
from audit.influence.index.rerank import fit_reranker, indexed_params, rerank, rerank_top
from tests.unit.influence_helpers import tiny_data, tiny_mlp
from tests.unit.test_influence_index import text_case


def _cases():
    model, train, queries = tiny_mlp(), tiny_data(40, seed=0), tiny_data(5, seed=1)
    yield "mlp", model, train, queries, IndexConfig(rank_in=2, rank_out=2, shard_rows=16)
    text, data = text_case(n=16)
    text.requires_grad_(False)
    for name, p in text.named_parameters():
        p.requires_grad_(name.startswith(("model.bert.encoder.layer.1.", "model.classifier")))
    yield "text", text, data, Subset(data, range(4)), IndexConfig(rank_in=3, rank_out=2, shard_rows=8, batch_size=4)


@pytest.mark.parametrize("case", ["mlp", "text"])
def test_shortlist_of_everything_is_the_engines_top_k(tmp_path, case):
    _, model, train, queries, config = next(c for c in _cases() if c[0] == case)
    index = build_index(model, train, tmp_path, config, progress=False)
    reranker = fit_reranker(index, model, train)
    want = compute(model, train, queries, reranker.config, progress=False, param_filter=reranker.param_filter,
                   fitted=reranker.fitted).scores
    expected, got = top_influences(want, 4), rerank_top(index, reranker, model, queries, 4, shortlist=len(train))
    for field in ("proponents", "opponents", "ranks"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    torch.testing.assert_close(got.proponent_scores, expected.proponent_scores)
    torch.testing.assert_close(got.opponent_scores, expected.opponent_scores)
    # the projected index alone ranks differently here (rank 2 x 2): re-ranking is what changed it
    projected = index.top(model, queries, 4)
    assert not torch.equal(projected.proponents, expected.proponents)


def test_short_shortlist_is_the_engines_ranking_of_the_pooled_shortlists(tmp_path):
    model, train, queries = tiny_mlp(), tiny_data(60, seed=0), tiny_data(6, seed=1)
    index = build_index(model, train, tmp_path, IndexConfig(rank_in=2, rank_out=2, shard_rows=16), progress=False)
    reranker = fit_reranker(index, model, train)
    exact = compute(model, train, queries, reranker.config, progress=False, param_filter=reranker.param_filter,
                    fitted=reranker.fitted).scores  # [Q, N]
    short = index.top(model, queries, 4)
    pooled = set(short.proponents.flatten().tolist()) | set(short.opponents.flatten().tolist())
    shortlisted = rerank(index, reranker, model, queries, shortlist=4)
    assert shortlisted.rows.tolist() == sorted(pooled) and len(pooled) < len(train)
    torch.testing.assert_close(shortlisted.scores, exact[:, sorted(pooled)])
    got = shortlisted.top(3)
    assert got.proponents.shape == (6, 3)
    outside = sorted(set(range(len(train))) - pooled)
    for q in range(6):
        for idx, scores, largest in ((got.proponents[q], got.proponent_scores[q], True),
                                     (got.opponents[q], got.opponent_scores[q], False)):
            assert set(idx.tolist()) <= pooled
            torch.testing.assert_close(scores, exact[q, idx])
            # nothing shortlisted that was left out ranks above (below) what was kept (up to
            # round-off: the shortlist was scored in other batches than `exact`)
            rest = exact[q, sorted(pooled - set(idx.tolist()))]
            slack = 1e-9 * float(exact.abs().max())
            assert (rest <= scores[-1] + slack).all() if largest else (rest >= scores[-1] - slack).all()
    # as rows over the whole training set (what an audit reads): exact where shortlisted, 0 elsewhere
    rows = shortlisted.dense(2, 5, len(train))
    assert rows.shape == (3, 60)
    torch.testing.assert_close(rows[:, sorted(pooled)], exact[2:5, sorted(pooled)])
    assert (rows[:, outside] == 0).all()


def test_curvature_is_fitted_once_and_restored(tmp_path):
    model, train = tiny_mlp(), tiny_data(50, seed=0)
    index = build_index(model, train, tmp_path, IndexConfig(rank_in=2, rank_out=2), progress=False)
    first = fit_reranker(index, model, train, fit_rows=30)
    stored = list((index.folder.folder / "rerank").rglob("*"))
    assert any(p.is_file() for p in stored)
    second = fit_reranker(index, model, train, fit_rows=30)
    for a, b in zip(first.fitted.curvature.values, second.fitted.curvature.values, strict=True):
        assert torch.equal(a, b)
    assert first.fit_rows == 30
    # a sample of 30 of the 50 rows: another curvature than the fit on all of them
    whole = fit_reranker(index, model, train)
    assert whole.fit_rows == 50
    assert not torch.equal(whole.fitted.curvature.values[0], first.fitted.curvature.values[0])
    assert first.params == indexed_params(index) == {f"{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}


def test_bad_options_are_refused_in_one_sentence(tmp_path):
    model, train, queries = tiny_mlp(), tiny_data(20, seed=0), tiny_data(3, seed=1)
    index = build_index(model, train, tmp_path, IndexConfig(rank_in=2, rank_out=2), progress=False)
    with pytest.raises(InvalidInput, match="index was built on"):
        fit_reranker(index, model, tiny_data(21, seed=0))
    with pytest.raises(InvalidInput, match="re-ranking method"):
        fit_reranker(index, model, train, method="graddot")
    reranker = fit_reranker(index, model, train)
    with pytest.raises(InvalidInput, match="shortlist"):
        rerank(index, reranker, model, queries, shortlist=0)
