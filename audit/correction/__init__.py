"""Correction: fix flagged mispredictions with a few fine-tuning steps on influential training
examples (Schioppa et al. 2023: influence predicts a short stretch of training well).

    from audit.correction import CorrectionConfig, repair_batch, propose_corrections
    candidates = propose_corrections(S, train, flagged, predicted, self_scores, k=10, train_probs=P)
    result = repair_batch(model, train, flagged, CorrectionConfig())   # result.model: repaired copy

Stages: `propose_corrections` (candidates table for the audit), `repair_batch` (one repaired
model), `search_repairs` (an ordered set of repair candidates compared on a selection split: the
one the correct flow gates and registers), `repair_per_query` (measurement protocol),
`influence_horizon` (how many steps the influence estimate can be trusted) and `trusted_steps`
(the step budget it supports). The benchmark's baselines live in bench/baselines.py.

Re-scoring between rounds (audit.correction.rescoring) fits `CorrectionConfig.method`'s curvature
once on the input model, or with method="index" builds a gradient index once, and reuses it in
every round and every per-query repair; `index_scorer` / `influence_scorer` make a scorer from an
index or a fitted curvature the caller already has (the `scorer=` of repair_batch/per_query).
"""

from audit.correction.batch import repair_batch
from audit.correction.candidates import propose_corrections
from audit.correction.config import CorrectionConfig, RepairResult
from audit.correction.finetune import finetune_steps
from audit.correction.horizon import influence_horizon, trusted_steps
from audit.correction.per_query import PER_QUERY_CONFIG, repair_per_query
from audit.correction.rescoring import INDEX, index_scorer, influence_scorer
from audit.correction.search import (
    DEFAULT_CANDIDATES,
    CandidateOutcome,
    RepairCandidate,
    SearchResult,
    search_repairs,
    selection_split,
)

__all__ = [
    "DEFAULT_CANDIDATES",
    "INDEX",
    "CandidateOutcome",
    "CorrectionConfig",
    "RepairCandidate",
    "SearchResult",
    "search_repairs",
    "selection_split",
    "PER_QUERY_CONFIG",
    "RepairResult",
    "finetune_steps",
    "index_scorer",
    "influence_horizon",
    "influence_scorer",
    "propose_corrections",
    "repair_batch",
    "repair_per_query",
    "trusted_steps",
]
