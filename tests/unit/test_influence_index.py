"""The gradient index (audit.influence.index): its rows are the projected per-example gradients,
its scores the engine's where nothing is projected, its top-k the dense top-k, and its shards are
reused exactly when their examples and the model are the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from audit.errors import IntegrityError, InvalidInput
from audit.influence import influence_scores, self_influence, top_influences
from audit.influence.config import InfluenceConfig
from audit.influence.context import evaluation, make_context
from audit.influence.index import IndexConfig, build_index
from audit.influence.index import query as index_query
from audit.text_classifier import TextClassifier
from tests.unit.influence_helpers import tiny_data, tiny_mlp


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()


def image_data(n: int, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    return TensorDataset(inputs, torch.randint(0, 3, (n,), generator=g))


def text_case(n: int = 12, length: int = 24):
    from tests.text_helpers import tiny_bert

    bert, _ = tiny_bert(num_labels=3)
    g = torch.Generator().manual_seed(2)
    ids = torch.zeros(n, length, dtype=torch.int64)
    for row in range(n):
        used = int(torch.randint(3, 10, (1,), generator=g))
        ids[row, 0], ids[row, 1 : used - 1], ids[row, used - 1] = 2, torch.randint(5, 30, (used - 2,), generator=g), 3
    return TextClassifier(bert, pad_token_id=0), TensorDataset(ids, torch.randint(0, 3, (n,), generator=g))


def full_gradients(model, data, names) -> torch.Tensor:
    """Per-example loss gradients [N, P] from the engine (no projection, no padding trimmed)."""
    with evaluation(model):
        ctx = make_context(model, data, InfluenceConfig(method="graddot"), None, False, lambda n, p: n in names)
        xs, ys = data.tensors
        return ctx.grads.loss_grads(xs, ys).double(), ctx.space


@pytest.mark.parametrize("case", ["cnn", "text"])
def test_rows_are_the_projected_per_example_gradients(tmp_path, case):
    # Whatever the layer (Conv2d patches, Linear over tokens, padding trimmed), a stored row is
    # P_out^T G_i P_in per layer, G_i the example's full weight-and-bias gradient.
    if case == "cnn":
        model, data = small_cnn(), image_data(9)
        config = IndexConfig(rank_in=5, rank_out=2, shard_rows=4, batch_size=3)
    else:
        model, data = text_case()
        config = IndexConfig(rank_in=6, rank_out=5, shard_rows=5, batch_size=4)
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("model.bert.encoder.layer.1.", "model.classifier")))
    index = build_index(model, data, tmp_path, config, progress=False)
    rows = torch.cat(list(index.rows())).double()
    full, space = full_gradients(model, data, set(index.header["params"]))
    expected = []
    for p in index.folder.projections():
        g = p.layer.matrix(full, space)  # [N, out, width]
        if p.p_out is not None:
            g = p.p_out.T @ g
        if p.p_in is not None:
            g = g @ p.p_in
        expected.append(g.reshape(len(full), -1))
    expected = torch.cat(expected, dim=1)
    assert rows.shape == expected.shape
    assert any(p.p_in is not None for p in index.folder.projections())  # something was projected
    torch.testing.assert_close(rows, expected, rtol=2e-4, atol=2e-5 * float(expected.abs().max()))


def test_single_layer_without_projection_and_gn_curvature_scores_like_exact(tmp_path):
    # One Linear layer, ranks above its sizes, curvature "gn": the index's block is the full
    # Gauss-Newton matrix, so scores, damping and self-influence are `exact`'s.
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    train, queries = tiny_data(40, seed=0), tiny_data(6, seed=1)
    config = IndexConfig(rank_in=64, rank_out=64, shard_rows=16, curvature="gn", fisher_samples=None)
    index = build_index(model, train, tmp_path, config, progress=False)
    want = influence_scores(model, train, queries, method="exact", progress=False)
    scale = float(want.abs().max())
    torch.testing.assert_close(index.scores(model, queries).double(), want, rtol=1e-4, atol=1e-5 * scale)
    want_self = self_influence(model, train, method="exact", progress=False)
    torch.testing.assert_close(index.self_influence().double(), want_self, rtol=1e-4, atol=1e-6)


def test_without_projection_the_default_curvature_is_the_engines_ekfac(tmp_path):
    # Every layer Linear and no side projected: projected EK-FAC, summed over shards, is EK-FAC.
    model, train, queries = tiny_mlp(), tiny_data(45, seed=0), tiny_data(6, seed=1)
    config = IndexConfig(rank_in=64, rank_out=64, shard_rows=10, fisher_samples=None)
    index = build_index(model, train, tmp_path, config, progress=False)
    want = influence_scores(model, train, queries, method="ekfac", progress=False)
    scale = float(want.abs().max())
    torch.testing.assert_close(index.scores(model, queries).double(), want, rtol=1e-4, atol=1e-5 * scale)
    want_self = self_influence(model, train, method="ekfac", progress=False)
    torch.testing.assert_close(index.self_influence().double(), want_self, rtol=1e-4, atol=1e-6)


def test_without_projection_on_text_it_is_the_engines_ekfac_padding_left_out_alike(tmp_path):
    # Token ids with padding: the index trims padding and leaves pad tokens out of A; the engine,
    # fed the same padded ids, must treat them the same way (pad tokens out of A, padding-only
    # columns trimmed) for the unprojected index to be its EK-FAC on the indexed layers.
    model, data = text_case(n=12)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("model.bert.encoder.layer.1.", "model.classifier")))
    queries = torch.utils.data.Subset(data, range(4))
    config = IndexConfig(rank_in=80, rank_out=80, shard_rows=5, batch_size=4, fisher_samples=None)
    index = build_index(model, data, tmp_path, config, progress=False)
    layers = {name for layer in index.header["layers"] for name in (layer["weight"], layer["bias"]) if name}
    want = influence_scores(model, data, queries, method="ekfac", progress=False,
                            param_filter=lambda n, p: n in layers)
    scale = float(want.abs().max())
    torch.testing.assert_close(index.scores(model, queries).double(), want.double(), rtol=1e-3, atol=1e-4 * scale)


def test_streamed_top_k_is_the_dense_top_k(tmp_path, monkeypatch):
    monkeypatch.setattr(index_query, "CHUNK_ROWS", 7)  # several chunks per shard, shards of 10
    model, train, queries = tiny_mlp(), tiny_data(53, seed=0), tiny_data(5, seed=1)
    index = build_index(model, train, tmp_path, IndexConfig(rank_in=3, rank_out=2, shard_rows=10), progress=False)
    dense = index.scores(model, queries)
    assert dense.shape == (5, 53)
    want, got = top_influences(dense, 6), index.top(model, queries, 6)
    for field in ("proponents", "opponents", "ranks"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    torch.testing.assert_close(got.proponent_scores, want.proponent_scores)


def test_grown_training_set_computes_only_new_shards(tmp_path):
    model, data = tiny_mlp(), tiny_data(55, seed=0)
    config = IndexConfig(rank_in=3, rank_out=2, shard_rows=10)
    first = build_index(model, torch.utils.data.Subset(data, range(40)), tmp_path / "a", config, progress=False)
    assert (first.stats.computed, first.stats.reused) == (4, 0)
    grown = build_index(model, data, tmp_path / "a", config, progress=False)
    assert (grown.stats.computed, grown.stats.reused) == (2, 4)
    fresh = build_index(model, data, tmp_path / "b", config, progress=False)
    assert torch.equal(torch.cat(list(grown.rows())), torch.cat(list(fresh.rows())))
    torch.testing.assert_close(grown.self_influence(), fresh.self_influence())
    again = build_index(model, data, tmp_path / "a", config, progress=False)
    assert (again.stats.computed, again.stats.reused) == (0, 6)


def test_index_belongs_to_one_model_state(tmp_path):
    model, train, queries = tiny_mlp(), tiny_data(20, seed=0), tiny_data(3, seed=1)
    config = IndexConfig(rank_in=3, rank_out=2)
    index = build_index(model, train, tmp_path, config, progress=False)
    with torch.no_grad():
        model[0].weight[0, 0] += 0.1
    with pytest.raises(InvalidInput, match="other model parameters"):
        index.scores(model, queries)
    assert index.scores(model, queries, stale_ok=True).shape == (3, 20)  # a repair's re-scoring
    moved = build_index(model, train, tmp_path, config, progress=False)
    assert moved.folder.folder != index.folder.folder and moved.stats.computed == 1


def test_damaged_shard_is_refused(tmp_path):
    model, train = tiny_mlp(), tiny_data(20, seed=0)
    index = build_index(model, train, tmp_path, IndexConfig(rank_in=3, rank_out=2), progress=False)
    path = index.folder.shard_path(index.shards[0].digest)
    rows = np.load(path)
    rows[0, 0] += 1.0
    np.save(path, rows)
    with pytest.raises(IntegrityError, match="checksum"):
        list(index.rows(verify=True))


def test_bad_options_and_models_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(InvalidInput, match="rank_in must be an integer >= 1.*storage must be one of"):
        IndexConfig(rank_in=0, storage="int8")
    norm_only = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3)).double()
    norm_only[1].requires_grad_(False)
    with pytest.raises(InvalidInput, match="covers Linear and Conv2d layers"):
        build_index(norm_only, tiny_data(5, seed=0), tmp_path, progress=False)


def test_merged_shard_tops_are_the_dense_top_k_ties_included():
    from audit.influence.topk import StreamingTop

    generator = torch.Generator().manual_seed(0)
    dense = torch.randint(-3, 4, (6, 47), generator=generator).float()  # many ties, across blocks too
    want = top_influences(dense, 8)
    merged, start = StreamingTop(8), 0
    for width in (10, 3, 20, 14):
        merged.add_top(top_influences(dense[:, start : start + width], 8), start)
        start += width
    got = merged.result()
    for field in ("proponents", "proponent_scores", "opponents", "opponent_scores", "ranks"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_shard_jobs_give_the_index_the_in_process_loop_gives(tmp_path):
    """The path every cluster takes (compute_shard per missing shard, then per-shard scoring
    jobs), run in this process: the same shards, rows, scores, top-k and self-influence."""
    from audit.influence.index.cluster import local_map

    model, train, queries = tiny_mlp(), tiny_data(53, seed=0), tiny_data(5, seed=1)
    config = IndexConfig(rank_in=3, rank_out=2, shard_rows=10)
    loop = build_index(model, train, tmp_path / "loop", config, progress=False)
    jobs = build_index(model, train, tmp_path / "jobs", config, progress=False, shard_map=local_map)
    assert jobs.shards == loop.shards and (jobs.stats.computed, jobs.stats.reused) == (6, 0)
    left = loop.preconditioned(loop.query_gradients(model, queries))
    assert torch.equal(jobs.scores_of(left, local_map), loop.scores_of(left))
    assert torch.equal(jobs.self_influence(local_map), loop.self_influence())
    got, want = jobs.top(model, queries, 6, shard_map=local_map), loop.top(model, queries, 6)
    for field in ("proponents", "proponent_scores", "opponents", "opponent_scores", "ranks"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_a_shard_job_refuses_rows_that_changed_and_a_model_that_is_not_the_indexed_one(tmp_path):
    from audit.influence.index.build import ShardJob, compute_shard, examples_digest, shard_rows

    model, train = tiny_mlp(), tiny_data(20, seed=0)
    config = IndexConfig(rank_in=3, rank_out=2, shard_rows=10)
    index = build_index(model, torch.utils.data.Subset(train, range(10)), tmp_path, config, progress=False)
    folder = str(index.folder.folder)
    job = ShardJob(1, 2, 10, 20, examples_digest(*shard_rows(tiny_data(20, seed=5), 10, 20))[:32])
    with pytest.raises(IntegrityError, match="changed while the index was being built"):
        compute_shard(job, model=model, train=train, folder=folder, config=config)
    job = ShardJob(1, 2, 10, 20, examples_digest(*shard_rows(train, 10, 20))[:32])
    with pytest.raises(IntegrityError, match="not the one the index"):
        compute_shard(job, model=tiny_mlp(seed=1), train=train, folder=folder, config=config)
    assert compute_shard(job, model=model, train=train, folder=folder, config=config).rows == 10


def test_auto_batch_size_follows_the_layers_and_changes_no_number(tmp_path):
    from audit.influence.index.build import model_context
    from audit.influence.index.projection import AUTO_BATCH_RANGE, Projector, indexed_layers, make_projections

    def auto(model, data):
        config = IndexConfig()
        with model_context(model, data, config, None, False, None) as ctx:
            found = indexed_layers(model, ctx)
            projector = Projector(ctx, found, make_projections([layer for layer, _ in found], config))
            return projector.auto_batch_size(data.tensors[0])

    data = tiny_data(30, seed=0)
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(4, 1 << 16), nn.Tanh(), nn.Linear(1 << 16, 3)).double()
    assert auto(tiny_mlp(), data) == AUTO_BATCH_RANGE[1]  # ~20 values per example
    assert auto(wide, data) == AUTO_BATCH_RANGE[0]  # ~131k values per example
    model = tiny_mlp()
    fixed = build_index(model, data, tmp_path / "fixed", IndexConfig(rank_in=3, rank_out=2, batch_size=7),
                        progress=False)
    sized = build_index(model, data, tmp_path / "auto", IndexConfig(rank_in=3, rank_out=2), progress=False)
    assert sized.folder.folder.name == fixed.folder.folder.name  # the batch size is not part of the key


def test_gram_sums_over_chunks_are_the_blocks_of_x_transpose_x(monkeypatch):
    from audit.influence.index import sums

    monkeypatch.setattr(sums, "CHUNK_ELEMENTS", 40)  # a product every few adds, one left for result()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(23, 7, generator=generator)
    gram = sums.GramSums((3, 4))
    for part in torch.split(x, [5, 1, 9, 8]):
        gram.add(part)
    full = x.double().T @ x.double()
    got = gram.result()
    assert gram.rows == 23 and [tuple(g.shape) for g in got] == [(3, 3), (4, 4)]
    torch.testing.assert_close(got[0], full[:3, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], full[3:, 3:], rtol=1e-5, atol=1e-5)
    assert gram.result()[1].equal(got[1])  # result() leaves the sums as they are
