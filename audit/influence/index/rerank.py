"""Exact re-ranking of the index's shortlist: retrieve with the projection, rank with the
unprojected curvature.

The projected scores rank the bulk of the training set well (Spearman 0.7-0.9 against
unprojected EK-FAC on MiniLM) but swap the very top: half of EK-FAC's top 10 is elsewhere in the
projected top 10. They are nearly all within its top 50-100, though (bench/RESULTS.md, "Exact
re-ranking"). So: take each query's `shortlist` most helpful and most harmful examples from the
index, pool them over the queries, score those (and only those) exactly with the engine's method
on the same parameters as the index (the indexed layers' weights and biases), preconditioned by a
curvature fitted once per index and model, and rank them by that.

By construction the result is the engine's top-k whenever the engine's top-k lies inside the
pooled shortlists; a shortlist of at least N keeps everything, and the result is the engine's top-k.
Cost per audit: the engine's per-example gradients of the shortlisted examples (their union over
the queries) and of the queries, instead of one matmul against the stored rows.

Sign and scale are the engine's (DESIGN.md): > 0 helpful, per unit weight in the mean loss. The
scores of a re-ranked top-k are the engine's, not the index's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from audit.errors import InvalidInput
from audit.influence.batches import dataset_size
from audit.influence.config import InfluenceConfig
from audit.influence.engine import FittedCurvature, compute, fit
from audit.influence.index.query import GradientIndex
from audit.influence.topk import TopInfluences, top_influences

RERANK_METHODS = ("ekfac", "kfac")
FIT_ROWS = 2048  # training examples the re-ranking curvature is fitted on, at most (a seeded sample beyond)


@dataclass(frozen=True)
class Reranker:
    """What re-ranking needs besides the index: the training set the index was built on, the
    engine's configuration and its curvature fitted once (`fit_reranker`), and the parameters
    both cover."""

    train: Dataset
    config: InfluenceConfig
    fitted: FittedCurvature
    params: frozenset[str]
    fit_rows: int  # training examples the curvature was fitted on

    def param_filter(self, name: str, param: torch.Tensor) -> bool:
        return name in self.params


def indexed_params(index: GradientIndex) -> frozenset[str]:
    """Names of the weights and biases of the layers the index covers."""
    return frozenset(name for layer in index.header["layers"] for name in (layer["weight"], layer["bias"]) if name)


def fit_reranker(index: GradientIndex, model: nn.Module, train: Dataset, method: str = "ekfac",
                 fit_rows: int = FIT_ROWS, device=None, progress: bool = False) -> Reranker:
    """The engine's `method` curvature (one of RERANK_METHODS) of `model` on the indexed layers,
    fitted on `train` (the index's training set, N rows) or, when N > `fit_rows`, on a seeded
    sample of `fit_rows` of its rows (the fit's cost is what grows with N). Stored in the index's
    folder and restored from there by later calls for the same model, sample and method."""
    if method not in RERANK_METHODS:
        raise InvalidInput(f"The re-ranking method must be one of {RERANK_METHODS}; got {method!r}.")
    if isinstance(fit_rows, bool) or not isinstance(fit_rows, int) or fit_rows < 1:
        raise InvalidInput(f"fit_rows must be an integer >= 1; got {fit_rows!r}.")
    n = dataset_size(train, "train")
    if n != index.n:
        raise InvalidInput(f"The training set has {n} examples but the index {index.n}; pass the training set the "
                           "index was built on.")
    params = indexed_params(index)
    config = InfluenceConfig(method=method, batch_size=index.config.batch_size or InfluenceConfig.batch_size,
                             seed=index.config.seed)
    sample = train
    if n > fit_rows:
        picked = torch.randperm(n, generator=torch.Generator().manual_seed(index.config.seed))[:fit_rows]
        sample = Subset(train, sorted(picked.tolist()))
    fitted = fit(model, sample, config, device, cache_dir=index.folder.folder / "rerank", progress=progress,
                 param_filter=lambda name, p: name in params)
    return Reranker(train, config, fitted, params, min(n, fit_rows))


@dataclass(frozen=True)
class Shortlisted:
    """The engine's exact scores [Q, U] of the queries against the U training examples `rows`
    (sorted training indices) that some query's shortlist holds."""

    rows: torch.Tensor  # [U] int64
    scores: torch.Tensor  # [Q, U]

    def top(self, k: int) -> TopInfluences:
        """The k most helpful and k most harmful shortlisted examples per query (k capped at U),
        indices into the training set; ties keep the lower index first, as top_influences."""
        top = top_influences(self.scores, k)
        return TopInfluences(self.rows[top.proponents], top.proponent_scores, self.rows[top.opponents],
                             top.opponent_scores, top.ranks)

    def dense(self, start: int, stop: int, n: int) -> torch.Tensor:
        """Queries start..stop-1 as rows over all `n` training examples [stop - start, n]: the
        exact scores at `rows`, 0 (not scored) elsewhere."""
        out = self.scores.new_zeros(stop - start, n)
        out[:, self.rows] = self.scores[start:stop]
        return out


def rerank(index: GradientIndex, reranker: Reranker, model: nn.Module, queries: Dataset, shortlist: int = 100,
           device=None, stale_ok: bool = False, progress: bool = False) -> Shortlisted:
    """Each query's `shortlist` most helpful and `shortlist` most harmful examples by the index,
    pooled over the queries, scored exactly by the engine (module docstring). `stale_ok` as in
    `GradientIndex.top`: the exact scores are always the current model's gradients, against the
    curvature fitted once."""
    if isinstance(shortlist, bool) or not isinstance(shortlist, int) or shortlist < 1:
        raise InvalidInput(f"shortlist must be an integer >= 1; got {shortlist!r}.")
    short = index.top(model, queries, shortlist, device, stale_ok)  # [Q, S] per side
    rows = torch.unique(torch.cat([short.proponents, short.opponents], dim=1))  # sorted
    exact = compute(model, Subset(reranker.train, rows.tolist()), queries, reranker.config, device,
                    progress=progress, param_filter=reranker.param_filter, fitted=reranker.fitted).scores
    return Shortlisted(rows, exact)


def rerank_top(index: GradientIndex, reranker: Reranker, model: nn.Module, queries: Dataset, k: int,
               shortlist: int = 100, device=None, stale_ok: bool = False, progress: bool = False) -> TopInfluences:
    """The k most helpful and k most harmful training examples per query by the engine's exact
    scores, among the examples shortlisted by the index (`rerank`): the engine's own top-k
    whenever it lies within the shortlists. TopInfluences [Q, min(k, U)], scores the engine's."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInput(f"k must be an integer >= 1; got {k!r}.")
    return rerank(index, reranker, model, queries, shortlist, device, stale_ok, progress).top(k)
