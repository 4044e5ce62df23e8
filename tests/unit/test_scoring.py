"""audit.scoring: what an audit scores with (an engine method, the gradient index, or the model's
size choosing), and the same scores whichever way they are handed out."""

import torch

from audit.examples import ExampleTable
from audit.influence import influence_scores, self_influence
from audit.influence.index import IndexConfig, build_index
from audit.scoring import AUTO, HEAD_INDEX_ABOVE, INDEX, INDEX_ABOVE, RERANKED, choose_method, score_flagged
from tests.unit.influence_helpers import tiny_data, tiny_mlp


def _table(n: int, seed: int) -> ExampleTable:
    inputs, labels = tiny_data(n, seed).tensors
    return ExampleTable(tuple(f"e{i}" for i in range(n)), inputs, labels)


def test_auto_keeps_ekfac_for_small_models_and_takes_the_index_beyond_the_bound():
    small = tiny_mlp()
    params = sum(p.numel() for p in small.parameters())
    assert choose_method(small, INDEX_ABOVE // params) == "ekfac"
    assert choose_method(small, INDEX_ABOVE // params + 1) == INDEX
    small[0].requires_grad_(False)  # only trainable parameters count (a model's tuned_params)
    assert choose_method(small, INDEX_ABOVE // params + 1) == "ekfac"
    # a frozen model's head, scored on features: EK-FAC up to the larger bound
    head = small[2]
    head_params = sum(p.numel() for p in head.parameters())
    assert choose_method(head, HEAD_INDEX_ABOVE // head_params, head=True) == "ekfac"
    assert choose_method(head, HEAD_INDEX_ABOVE // head_params, head=False) == INDEX
    assert choose_method(head, HEAD_INDEX_ABOVE // head_params + 1, head=True) == INDEX


def test_auto_on_a_small_model_gives_the_engines_ekfac_scores(tmp_path):
    model, train, flagged = tiny_mlp(), _table(30, seed=0), _table(4, seed=1)
    scored = score_flagged(model, train, flagged, AUTO, tmp_path)
    train, flagged = train.dataset(), flagged.dataset()
    assert scored.method == "ekfac" and scored.index is None
    blocks = torch.cat([block for _, block in scored.scores])
    torch.testing.assert_close(blocks, influence_scores(model, train, flagged, method="ekfac", progress=False))
    torch.testing.assert_close(scored.self_scores, self_influence(model, train, method="ekfac", progress=False))


def test_index_scores_come_in_blocks_that_make_up_the_index_scores(tmp_path, monkeypatch):
    import audit.scoring

    monkeypatch.setattr(audit.scoring, "BLOCK_ELEMENTS", 2 * 30)  # two flagged rows per block
    model, train, flagged = tiny_mlp(), _table(30, seed=0), _table(5, seed=1)
    config = IndexConfig(rank_in=3, rank_out=2)
    scored = score_flagged(model, train, flagged, INDEX, tmp_path, index_config=config)
    train, flagged = train.dataset(), flagged.dataset()
    starts = [start for start, _ in scored.scores]
    assert starts == [0, 2, 4] and scored.method == INDEX and scored.index["rows"] == 30
    index = build_index(model, train, tmp_path / "index", config, progress=False)
    assert index.stats.computed == 0  # the audit built it; this reads it
    blocks = torch.cat([block for _, block in scored.scores])
    torch.testing.assert_close(blocks, index.scores(model, flagged))
    torch.testing.assert_close(scored.self_scores, index.self_influence())


def test_reranked_scores_are_the_engines_on_the_shortlists_and_zero_elsewhere(tmp_path, monkeypatch):
    import audit.scoring
    from audit.influence.engine import compute
    from audit.influence.index.rerank import fit_reranker

    monkeypatch.setattr(audit.scoring, "RERANK_SHORTLIST", 3)
    monkeypatch.setattr(audit.scoring, "BLOCK_ELEMENTS", 2 * 40)
    model, train, flagged = tiny_mlp(), _table(40, seed=0), _table(5, seed=1)
    config = IndexConfig(rank_in=2, rank_out=2)
    scored = score_flagged(model, train, flagged, RERANKED, tmp_path, index_config=config)
    assert scored.method == RERANKED and scored.index["rerank"]["shortlist"] == 3
    train, flagged = train.dataset(), flagged.dataset()
    index = build_index(model, train, tmp_path / "index", config, progress=False)
    short = index.top(model, flagged, 3)
    pooled = sorted(set(short.proponents.flatten().tolist()) | set(short.opponents.flatten().tolist()))
    assert scored.index["rerank"]["scored_rows"] == len(pooled) < 40
    reranker = fit_reranker(index, model, train)  # restored from the audit's fit
    exact = compute(model, train, flagged, reranker.config, progress=False, param_filter=reranker.param_filter,
                    fitted=reranker.fitted).scores
    blocks = torch.cat([block for _, block in scored.scores])
    torch.testing.assert_close(blocks[:, pooled], exact[:, pooled])
    outside = [i for i in range(40) if i not in pooled]
    assert (blocks[:, outside] == 0).all()
    torch.testing.assert_close(scored.self_scores, index.self_influence())


def test_auto_scores_a_frozen_models_head_with_ekfac_where_the_whole_model_gets_the_index(tmp_path, monkeypatch):
    import audit.scoring

    monkeypatch.setattr(audit.scoring, "INDEX_ABOVE", 1)  # every model is "large" for the whole-model bound
    train, flagged = _table(30, seed=0), _table(4, seed=1)
    whole = tiny_mlp()
    assert score_flagged(whole, train, flagged, AUTO, tmp_path / "whole").method == INDEX
    frozen = tiny_mlp()
    frozen[0].requires_grad_(False)  # the trainable part is the last layer: a head scored on features
    assert score_flagged(frozen, train, flagged, AUTO, tmp_path / "frozen").method == "ekfac"
