"""Re-scoring during a repair: the influence of the training set on the still-wrong flagged queries,
for the current (partly repaired) model, once per round.

    with rescoring(model, train, config.method) as scorer:     # fits or builds once, for `model`
        S = scorer(repaired, current_train, queries)            # [Q, N], any later round

What is fitted once on the input model and reused by every round (and, in per-query mode, by every
query's repair) depends on `CorrectionConfig.method`:
- a curvature method (ekfac, kfac, arnoldi, exact): the curvature (`fit_influence_curvature`);
  only the gradients follow the repaired model;
- "index" (INDEX): a gradient index of the training set (audit.influence.index): the training rows
  stay at the input model's parameters, the queries' gradients follow the repaired model;
- methods without a fit (graddot, gradcos): nothing; every round is computed afresh.
Both reuses score a model a few fine-tuning steps away from the one the curvature or the rows
belong to: an approximation valid over a short horizon (Schioppa et al. 2023), which the
correction's step budget stays inside (audit.correction.horizon). Sign as everywhere
(DESIGN.md): > 0 helpful to the query's reviewer label.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator

import torch
from torch import nn

from audit.errors import InvalidInput
from audit.examples import ExampleTable
from audit.scoring import INDEX  # CorrectionConfig.method that re-scores against a gradient index

# scorer(model, train, queries) -> [Q, N] influence scores at the queries' labels
Scorer = Callable[[nn.Module, ExampleTable, ExampleTable], torch.Tensor]


def influence_scorer(method: str, fitted=None) -> Scorer:
    """Scorer backed by `audit.influence.influence_scores` with the given method; `fitted` (its
    FittedCurvature, fit_influence_curvature) is used by every call instead of a fit per call."""

    def score(model: nn.Module, train: ExampleTable, queries: ExampleTable) -> torch.Tensor:
        from audit.influence import influence_scores

        return influence_scores(model, train.dataset(), queries.dataset(), method=method, progress=False,
                                fitted=fitted)

    return score


def index_scorer(index, model: nn.Module, train: ExampleTable) -> Scorer:
    """Scorer against `index`, a GradientIndex built for `model` and `train` (build_index).

    A call scores the queries' gradients at the model it is given (stale_ok: a repaired model a
    few steps on) against the stored rows, which stay at `model`'s parameters. Training examples
    whose label the repair has changed (relabel) are re-projected at their new label, at `model`,
    so that their row matches the label they are now trained with. Returns float32 [Q, N]."""
    if index.n != len(train):
        raise InvalidInput(f"The gradient index holds {index.n} training rows but the training set has {len(train)}; "
                           "build the index for this training set.")
    ids, indexed_labels = tuple(train.ids), train.labels.clone()

    def score(current: nn.Module, table: ExampleTable, queries: ExampleTable) -> torch.Tensor:
        if tuple(table.ids) != ids:
            raise InvalidInput("The index scorer was given another training set than the one indexed.")
        left = index.preconditioned(index.query_gradients(current, queries.dataset(), stale_ok=True))  # [Q, D]
        out = index.scores_of(left)  # [Q, N]
        changed = (table.labels != indexed_labels).nonzero().flatten()
        if len(changed):
            # at the indexed model, so stale_ok=False also checks that `index` belongs to `model`
            rows = index.query_gradients(model, table.subset(changed.numpy()).dataset()).float()  # [R, D]
            out[:, changed] = left @ rows.T
        return out

    return score


@contextlib.contextmanager
def rescoring(model: nn.Module, train: ExampleTable, method: str, scorer: Scorer | None = None) -> Iterator[Scorer]:
    """The scorer a repair of `model` re-scores with, for the duration of the block. Its first call
    fits the curvature (or builds the index) on `model` and `train`, whatever model that call is
    given, and every later call reuses it (see the module docstring); a repair that never re-scores
    fits nothing. `scorer` (e.g. `index_scorer` of an index the caller keeps, or `influence_scorer`
    with a curvature the caller fitted) is used as given instead. INDEX builds the index with the
    default IndexConfig in a temporary folder, removed when the block exits."""
    if scorer is not None:
        yield scorer
        return
    with contextlib.ExitStack() as stack:

        def make() -> Scorer:
            if method == INDEX:
                from audit.influence.index import build_index

                root = stack.enter_context(tempfile.TemporaryDirectory(prefix="audit-correction-index-"))
                return index_scorer(build_index(model, train.dataset(), root, progress=False), model, train)
            from audit.influence import InfluenceConfig, fit_influence_curvature

            # the options of influence_scores' defaults, so that every call accepts the fitted curvature
            fitted = fit_influence_curvature(model, train.dataset(), InfluenceConfig(method=method), progress=False)
            return influence_scorer(method, fitted)

        made: list[Scorer] = []

        def score(current: nn.Module, table: ExampleTable, queries: ExampleTable) -> torch.Tensor:
            if not made:
                made.append(make())
            return made[0](current, table, queries)

        yield score
