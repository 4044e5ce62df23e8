"""The audit's scores: influence of every training example on every flagged example, and
self-influence, from one of the engine's methods or from the gradient index.

The engine's methods (audit.influence) recompute every training gradient on each audit; the index
(audit.influence.index) is built once per model version and training set under the cache folder
and read by every later audit of that version. docs/influence.md says which to choose when.
Sign as everywhere (DESIGN.md): > 0 helpful to the flagged example's reviewer label.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from audit.examples import ExampleTable
from audit.frozen_features import split_frozen
from audit.influence import METHODS, influence_scores, self_influence
from audit.influence.index import IndexConfig, build_index
from audit.influence.index.cluster import ShardMap
from audit.influence.index.rerank import fit_reranker, rerank

INDEX = "index"  # the method name that selects the gradient index
# the index's shortlist of each flagged example re-scored exactly by EK-FAC (audit.influence.index.rerank)
RERANKED = "index-reranked"
AUTO = "auto"  # the method name that lets the model's size choose (choose_method)
SCORING_METHODS = (*METHODS, INDEX, RERANKED, AUTO)
# RERANKED: most helpful and most harmful examples per flagged example that the index shortlists.
# Measured on MiniLM, 1,000 phrases, 50 flagged (bench/RESULTS.md, "Exact re-ranking"): EK-FAC's top
# 10 kept 0.93 / 0.97 / 0.99 at 25 / 50 / 100 per side, for 23 / 27 / 29 s per audit (21 s at 50
# once the engine trimmed padding).
RERANK_SHORTLIST = 50
# auto: the index once N x P (training examples x parameters scored) exceeds this. Measured
# (bench/RESULTS.md, "Gradient index"): below it EK-FAC takes seconds to a minute and is what the
# index approximates; above it EK-FAC's passes over per-example gradients take many minutes per
# audit while the index is built once per version.
INDEX_ABOVE = 2**30
# auto, for a frozen model's trainable head (audit.frozen_features): EK-FAC on the head costs one
# pass of the frozen layers plus small head passes (MiniLM's pooler + classifier, P = 148,610:
# 369 s at 20k sentences on 2 cores), while the index's 16 x 16 projection of such a head keeps 6-27%
# of EK-FAC's top 10 (Spearman 0.15-0.23; bench/RESULTS.md, "Frozen features"). Up to this N x P
# (about 115k examples of that head) the exact ranking is worth its minutes.
HEAD_INDEX_ABOVE = 2**34


BLOCK_ELEMENTS = 2**25  # scores held at once when they come in blocks: 128 MiB of float32


@dataclass(frozen=True)
class ScoreBlocks:
    """Influence scores [Q, N] (Q flagged, N training examples) handed out in blocks of flagged
    rows, so that a consumer never needs the whole matrix: `block(start, stop)` -> [stop - start, N]."""

    n_queries: int
    n_train: int
    block: Callable[[int, int], torch.Tensor]
    rows_per_block: int

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, scores [b, N]) for consecutive blocks covering every flagged row once."""
        for start in range(0, self.n_queries, self.rows_per_block):
            yield start, self.block(start, min(start + self.rows_per_block, self.n_queries))

    @staticmethod
    def dense(scores: torch.Tensor) -> ScoreBlocks:
        """Blocks of a matrix already in memory (the engine's methods compute it whole)."""
        rows = max(1, len(scores))
        return ScoreBlocks(scores.shape[0], scores.shape[1], lambda start, stop: scores[start:stop], rows)


@dataclass(frozen=True)
class FlaggedScores:
    """`scores` of the training set against the flagged batch, `self_scores` [N], the `method`
    that produced them (what AUTO chose), and, when the index produced them, what the index was
    (`GradientIndex.describe()`), else None."""

    scores: ScoreBlocks
    self_scores: torch.Tensor
    method: str
    index: dict | None = None


def choose_method(model: nn.Module, n_train: int, head: bool = False) -> str:
    """What AUTO scores with: EK-FAC while N x P (training examples x trainable parameters) is at
    most INDEX_ABOVE, or HEAD_INDEX_ABOVE when `model` is the trainable head of a frozen model,
    scored on the frozen part's features (`head`); the gradient index beyond."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return INDEX if n_train * params > (HEAD_INDEX_ABOVE if head else INDEX_ABOVE) else "ekfac"


def score_flagged(model: nn.Module, train: ExampleTable, flagged: ExampleTable, method: str,
                  cache_dir: str | os.PathLike, progress: bool = False, index_config: IndexConfig | None = None,
                  metadata: dict | None = None, shard_map: ShardMap | None = None) -> FlaggedScores:
    """Scores of `train` against `flagged` (flagged at the reviewer's labels) with `method`: an
    engine method, INDEX, RERANKED (the index's RERANK_SHORTLIST per side and flagged example,
    pooled, scored exactly by EK-FAC; every other score is 0, not scored), or AUTO (choose_method).

    `cache_dir` keeps what later audits of the same model reuse: the engine's fitted curvatures,
    or the index under `<cache_dir>/index` (built on the first audit, `index_config` its options,
    with RERANKED also the EK-FAC curvature of its re-scoring, fitted once; `metadata` such as
    the model's name and version recorded in it). `shard_map`
    (audit.influence.index.cluster): where the index's shard jobs run (its build, the score
    blocks, self-influence), e.g. Dask workers; the engine's methods run here whatever it is. The
    score blocks call it when they are read: keep it open until the findings are built.

    The engine's methods score the model's trainable head on its frozen part's features when the
    rest of the model is frozen (audit.frozen_features): the same gradients, one pass of the
    frozen layers instead of one per influence pass. The index keeps the whole model: a stored
    index is read without a pass over the training set."""
    # the index keeps the whole model: asked for by name, it needs no frozen/head split
    frozen = None if method in (INDEX, RERANKED) else split_frozen(model, train.inputs)
    if method == AUTO:
        method = choose_method(frozen.head, len(train), head=frozen.is_split)
    if method in (INDEX, RERANKED):
        index = build_index(model, train.dataset(), Path(cache_dir) / "index", index_config or IndexConfig(),
                            progress=progress, metadata=metadata, shard_map=shard_map)
        if method == RERANKED:
            reranker = fit_reranker(index, model, train.dataset(), progress=progress)
            short = rerank(index, reranker, model, flagged.dataset(), RERANK_SHORTLIST, progress=progress)
            blocks = ScoreBlocks(len(flagged), index.n, lambda start, stop: short.dense(start, stop, index.n),
                                 max(1, BLOCK_ELEMENTS // index.n))
            described = {**index.describe(), "rerank": {"method": reranker.config.method, "shortlist": RERANK_SHORTLIST,
                                                        "fit_rows": reranker.fit_rows, "scored_rows": len(short.rows)}}
            return FlaggedScores(blocks, index.self_influence(shard_map), RERANKED, described)
        left = index.preconditioned(index.query_gradients(model, flagged.dataset()))  # [Q, D]: small next to [Q, N]
        blocks = ScoreBlocks(len(left), index.n, lambda start, stop: index.scores_of(left[start:stop], shard_map),
                             max(1, BLOCK_ELEMENTS // index.n))
        return FlaggedScores(blocks, index.self_influence(shard_map), INDEX, index.describe())
    head_train, head_flagged = frozen.table(train).dataset(), frozen.table(flagged).dataset()
    scores = influence_scores(frozen.head, head_train, head_flagged, method=method, cache_dir=cache_dir,
                              progress=progress)
    self_scores = self_influence(frozen.head, head_train, method=method, cache_dir=cache_dir, progress=progress)
    return FlaggedScores(ScoreBlocks.dense(scores), self_scores, method)
