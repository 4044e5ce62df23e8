"""Influence horizon: for how many fine-tuning steps does influence predict what training on the
selected examples actually does to a flagged query's loss? (Schioppa et al. 2023: influence
predicts a short stretch of training well and fades after.) The correction's step budget is
chosen from this curve."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from audit.correction.batch import check_inputs
from audit.correction.config import CorrectionConfig
from audit.correction.finetune import finetune_steps
from audit.correction.rescoring import rescoring
from audit.errors import InvalidInput, NumericalError
from audit.examples import ExampleTable
from audit.training import predict_logits


def influence_horizon(
    model: nn.Module, train: ExampleTable, flagged: ExampleTable, config: CorrectionConfig,
    steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32), scores: torch.Tensor | None = None, max_queries: int = 16,
) -> pd.DataFrame:
    """Correlation between predicted and actual query-loss change after s fine-tuning steps.

    For each of the first `max_queries` flagged queries (loss at the reviewer's label) and three
    training subsets of size `config.k` (its most helpful, its most harmful, a seeded random
    one), fine-tune a copy of `model` on the subset alone (`config.lr`, `config.optimizer`) and
    record the actual loss change after each s in `steps`. The prediction for a subset is
    -mean of its scores (positive score = lower loss), the first-order change per unit of
    training on it; Pearson is invariant to that unit. Returns one row per s: `steps`,
    `pearson`, `spearman`, `n_pairs` (query x subset pairs, NaN correlations if < 3 or constant,
    or if any pair's loss is not finite by then: steps that diverge are no horizon, and
    trusted_steps stops before them).
    """
    if not steps or any(int(s) < 1 for s in steps):
        raise InvalidInput(f"steps must be positive step counts; got {steps}.")
    if max_queries < 1:
        raise InvalidInput(f"max_queries must be at least 1; got {max_queries}.")
    check_inputs(train, flagged, scores)
    n_queries = min(max_queries, len(flagged))
    queries = flagged.subset(list(range(n_queries)))
    if scores is None:
        with rescoring(model, train, config.method) as scorer:
            scores = scorer(model, train, queries)
    scores = scores[:n_queries]  # [Q, N]
    eligible = torch.tensor([i not in set(flagged.ids) for i in train.ids])  # never train on flagged
    pool = eligible.nonzero().flatten()  # [M]
    k = min(config.k, len(pool))
    generator = torch.Generator().manual_seed(config.seed)
    horizon = sorted({int(s) for s in steps})
    predicted, actual = [], {s: [] for s in horizon}
    for q in range(n_queries):
        row = scores[q, pool]  # [M]
        subsets = (pool[torch.topk(row, k).indices], pool[torch.topk(-row, k).indices],
                   pool[torch.randperm(len(pool), generator=generator)[:k]])
        x, y = queries.inputs[q : q + 1], queries.labels[q : q + 1]
        before = _loss(model, x, y)
        for subset in subsets:
            predicted.append(-scores[q, subset].mean().item())
            losses = {}
            copy_ = copy.deepcopy(model)
            try:
                finetune_steps(copy_, train.inputs[subset], train.labels[subset], horizon[-1], config.lr,
                               optimizer=config.optimizer,
                               # called during this iteration only, so the loop variables are the current ones
                               callback=lambda s: losses.__setitem__(s, _loss(copy_, x, y)) if s in actual else None)  # noqa: B023
            except NumericalError:
                pass  # the steps diverged: the steps from there on have no loss (NaN below)
            for s in horizon:
                actual[s].append(losses.get(s, math.nan) - before)
    rows = []
    for s in horizon:
        frame = pd.DataFrame({"predicted": predicted, "actual": actual[s]})
        rows.append({"steps": s, "pearson": _corr(frame, "pearson"), "spearman": _corr(frame, "spearman"),
                     "n_pairs": len(frame)})
    return pd.DataFrame(rows, columns=["steps", "pearson", "spearman", "n_pairs"])


def trusted_steps(horizon: pd.DataFrame, min_correlation: float = 0.5) -> int:
    """The step budget the horizon supports: the largest s such that the Pearson correlation at
    every measured step count up to s is >= `min_correlation` (NaN counts as below). 1 when
    even the first measurement is below: one step is the least a repair can take, and the gates
    still verify it. `horizon` is the frame `influence_horizon` returns."""
    if not 0.0 <= min_correlation <= 1.0:
        raise InvalidInput(f"min_correlation must be in [0, 1]; got {min_correlation}.")
    budget = 1
    for row in horizon.sort_values("steps").itertuples(index=False):
        if not row.pearson >= min_correlation:  # also catches NaN
            break
        budget = int(row.steps)
    return budget


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return nn.functional.cross_entropy(predict_logits(model, x), y).item()


def _corr(frame: pd.DataFrame, method: str) -> float:
    # a pair whose steps diverged (non-finite loss) leaves the whole step count untrusted
    if not np.isfinite(frame["actual"]).all():
        return float(np.nan)
    if len(frame) < 3 or frame["predicted"].nunique() < 2 or frame["actual"].nunique() < 2:
        return float(np.nan)
    return float(frame["predicted"].corr(frame["actual"], method=method))
