"""Correction candidates: which training labels to edit (relabel), drop (remove) or inspect
(review), each with its evidence. Stage `propose_corrections` of the audit.

Sign convention (DESIGN.md): `scores[q, i] > 0` means up-weighting training example i lowers
query q's loss at the reviewer's label; harmful = most negative.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch

from audit.errors import InvalidInput
from audit.examples import ExampleTable

COLUMNS = ["train_id", "action", "current_label", "proposed_label", "evidence_queries",
           "evidence_scores", "evidence_ranks", "reason"]


@dataclass(frozen=True)
class Evidence:
    """One query's vote for a training example: query position, score and harmfulness rank (1 = most harmful)."""

    query: int
    score: float
    rank: int


def harmful_label_matches(
    scores: torch.Tensor, train_labels: torch.Tensor, predicted: torch.Tensor, k: int,
    eligible: torch.Tensor | None = None, query_offset: int = 0,
) -> dict[int, list[Evidence]]:
    """For each query q, the `k` most harmful training examples (score < 0) whose label equals the
    wrong prediction `predicted[q]`; returns train position -> evidence from every query naming it.

    `scores` [Q, N], `train_labels` [N], `predicted` [Q], `eligible` optional bool [N] mask.
    Ranks count all N training examples (1 = most negative score of the query). Evidence names
    query `query_offset + q` (scores of a block of queries that starts there).
    """
    found: dict[int, list[Evidence]] = {}
    order = torch.argsort(scores, dim=1)  # [Q, N], most harmful first
    for q in range(scores.shape[0]):
        row = order[q]
        match = (train_labels[row] == predicted[q]) & (scores[q, row] < 0)  # [N] in rank order
        if eligible is not None:
            match &= eligible[row]
        for rank0 in match.nonzero().flatten()[:k].tolist():
            i = int(row[rank0])
            found.setdefault(i, []).append(Evidence(query_offset + q, float(scores[q, i]), rank0 + 1))
    return found


def propose_label(
    evidence: list[Evidence], reviewer_labels: torch.Tensor, current: int,
    probs: torch.Tensor | None, min_confidence: float,
) -> tuple[int | None, str]:
    """Label to write on one harmful training example and why; None when no label is plausible.

    The reviewer's label of the queries it harms (weighted by |score| when they differ) is the
    default. With the model's probabilities `probs` [C] on the example, its prediction decides
    when confident (probability >= `min_confidence`, not the current label): measured on digits,
    a confident prediction was right for 76 of 77 examples where it differed from the reviewer's
    label, the reviewer's label for none. An unconfident prediction that differs from the
    reviewer's label leaves no plausible label (None).
    """
    weight: dict[int, float] = {}
    for e in evidence:
        label = int(reviewer_labels[e.query])
        weight[label] = weight.get(label, 0.0) + abs(e.score)
    reviewer = max(weight, key=weight.get)
    plural = "ies" if len(evidence) > 1 else "y"
    if probs is None:
        return reviewer, f"the reviewer labelled the harmed quer{plural} {reviewer}"
    guess, confidence = int(probs.argmax()), float(probs.max())
    if guess != current and confidence >= min_confidence:
        source = ("and so did the reviewer for the harmed quer" + plural if guess == reviewer
                  else "(the reviewer's label does not fit it)")
        return guess, f"the model predicts {guess} with probability {confidence:.2f} {source}"
    if guess == reviewer:
        return reviewer, (f"the reviewer labelled the harmed quer{plural} {reviewer} and the model agrees "
                          f"(probability {confidence:.2f})")
    return None, (f"the model is unsure (predicts {guess} with probability {confidence:.2f}) and disagrees with "
                  f"the reviewer's {reviewer}")


def propose_corrections(
    scores: torch.Tensor,
    train: ExampleTable,
    flagged: ExampleTable,
    predicted: torch.Tensor,
    self_scores: torch.Tensor | None,
    k: int = 10,
    *,
    train_probs: torch.Tensor | None = None,
    min_confidence: float = 0.5,
    review_z: float = 3.5,
    max_review: int = 20,
) -> pd.DataFrame:
    """Correction candidates as a DataFrame with columns `COLUMNS`, one row per training example.

    - relabel: among each flagged query's harmful examples, the `k` most harmful whose label
      equals the query's wrong prediction `predicted` [Q]; proposed label from `propose_label`
      (`flagged.labels` are the reviewer's labels; `train_probs` [N, C] the model's probabilities
      on the training set, optional but recommended). With `train_probs`, such an example becomes
      `review` instead when the model fits its current label, and `remove` when no label is
      plausible (unsure model disagreeing with the reviewer).
    - review: training examples whose self-influence `self_scores` [N] lies more than `review_z`
      robust standard deviations above the median (at most `max_review`, largest first), when not
      already a relabel candidate.
    Evidence lists (queries by example id, scores, harmfulness ranks among all N) are ordered by
    score; relabel rows come first, most harmful first.
    """
    q, n = len(flagged), len(train)
    if scores.shape != (q, n):
        raise InvalidInput(f"scores must have shape [flagged, train] = [{q}, {n}]; found {list(scores.shape)}.")
    if predicted.shape != (q,):
        raise InvalidInput(f"predicted must hold one label per flagged example ({q}); "
                           f"found shape {list(predicted.shape)}.")
    if self_scores is not None and self_scores.shape != (n,):
        raise InvalidInput(f"self_scores must have shape [{n}]; found {list(self_scores.shape)}.")
    if train_probs is not None and train_probs.shape[0] != n:
        raise InvalidInput(f"train_probs must have one row per training example ({n}); found {train_probs.shape[0]}.")
    found = relabel_evidence(scores, train.labels, flagged.labels, predicted, k)
    return candidates_from_evidence(found, train, flagged, self_scores, train_probs, min_confidence=min_confidence,
                                    review_z=review_z, max_review=max_review)


def relabel_evidence(scores: torch.Tensor, train_labels: torch.Tensor, reviewer: torch.Tensor, predicted: torch.Tensor,
                     k: int, query_offset: int = 0) -> dict[int, list[Evidence]]:
    """`harmful_label_matches` of the queries the model really gets wrong (`predicted` [Q] differs
    from the `reviewer` labels [Q]); the others carry no relabel evidence. `scores` [Q, N] may be a
    block of queries starting at `query_offset`."""
    masked = scores.clone()
    masked[predicted == reviewer] = 0.0  # score 0 never counts as harmful
    return harmful_label_matches(masked, train_labels, predicted, k, query_offset=query_offset)


def candidates_from_evidence(
    found: dict[int, list[Evidence]], train: ExampleTable, flagged: ExampleTable, self_scores: torch.Tensor | None,
    train_probs: torch.Tensor | Mapping[int, torch.Tensor] | None, *, min_confidence: float = 0.5,
    review_z: float = 3.5, max_review: int = 20,
) -> pd.DataFrame:
    """The candidates table of `propose_corrections` from its relabel evidence (`relabel_evidence`,
    merged over blocks of queries). `train_probs`: the model's probabilities [C] of each training
    position in `found`, as an [N, C] tensor or a mapping from position (only those are read)."""
    rows = []
    for i, evidence in sorted(found.items(), key=lambda item: min(e.score for e in item[1])):
        evidence = sorted(evidence, key=lambda e: e.score)
        current = int(train.labels[i])
        probs = None if train_probs is None else train_probs[i]
        label, why = propose_label(evidence, flagged.labels, current, probs, min_confidence)
        harms = (f"Labelled {current}, the wrong prediction, and among the most harmful examples for "
                 f"{len(evidence)} flagged quer{'ies' if len(evidence) > 1 else 'y'}")
        if probs is not None and int(probs.argmax()) == current:
            # measured on digits: harmful examples the model fits are almost never mislabelled
            rows.append(_row(train.ids[i], "review", current, None, evidence, flagged,
                             f"{harms}, but the model fits its label (probability {float(probs.max()):.2f}); "
                             "check it by hand."))
        elif label is None:
            rows.append(_row(train.ids[i], "remove", current, None, evidence, flagged,
                             f"{harms}; no label is plausible because {why}."))
        else:
            rows.append(_row(train.ids[i], "relabel", current, label, evidence, flagged,
                             f"{harms}; proposed {label} because {why}."))
    if self_scores is not None:
        median = self_scores.median()
        spread = 1.4826 * (self_scores - median).abs().median() + 1e-12
        z = (self_scores - median) / spread  # [N] robust z-score
        for i in torch.argsort(z, descending=True)[:max_review].tolist():
            if z[i] < review_z:
                break
            if i in found:
                continue
            rows.append({"train_id": train.ids[i], "action": "review", "current_label": int(train.labels[i]),
                         "proposed_label": None, "evidence_queries": [], "evidence_scores": [], "evidence_ranks": [],
                         "reason": f"Self-influence {float(self_scores[i]):.3g} is {float(z[i]):.1f} robust standard "
                                   "deviations above the median: unusual for the model, possibly mislabelled."})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["proposed_label"] = frame["proposed_label"].astype("Int64")
    return frame


def _row(train_id: str, action: str, current: int, proposed: int, evidence: list[Evidence],
         flagged: ExampleTable, reason: str) -> dict:
    return {"train_id": train_id, "action": action, "current_label": current, "proposed_label": proposed,
            "evidence_queries": [flagged.ids[e.query] for e in evidence],
            "evidence_scores": [e.score for e in evidence],
            "evidence_ranks": [e.rank for e in evidence], "reason": reason}
