"""What each correction strategy trains on in one round, given the still-wrong queries' scores.

- reinforce: descend on each query's `k` most helpful training examples that the model fits
  (the paper's protocol, minus examples whose label the model rejects).
- relabel: edit the labels of harmful examples whose label equals the wrong prediction and that
  the model itself does not fit, then descend on the edited examples.
- unlearn: bounded gradient ascent on each query's `k` most harmful examples.
Replay (a random sample of the training set with its current labels) is added by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from audit.correction.candidates import harmful_label_matches, propose_label


@dataclass(frozen=True)
class Plan:
    """Training positions to descend on (with labels), to ascend on, and label edits (position -> label)."""

    descend: tuple[int, ...] = ()
    descend_labels: tuple[int, ...] = ()
    ascend: tuple[int, ...] = ()
    relabels: dict[int, int] = field(default_factory=dict)

    @property
    def selected(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(self.descend + self.ascend))


# planner(strategy, scores [Q, N], train_labels [N], predicted [Q], reviewer [Q], k, eligible [N],
#         train_probs [N, C], min_confidence, reinforce_k) -> Plan; `plan_round` is the product's
Planner = Callable[..., "Plan"]


def top_per_query(scores: torch.Tensor, k: int, eligible: torch.Tensor, helpful: bool) -> list[int]:
    """Union (first-seen order) of each query's `k` highest (helpful) or lowest (harmful) scores
    among `eligible` [N] training positions, keeping only scores of the right sign. `scores` [Q, N]."""
    signed = scores if helpful else -scores  # [Q, N], larger = more wanted
    signed = signed.masked_fill(~eligible, float("-inf"))
    chosen: dict[int, None] = {}
    for row in signed:
        top = torch.topk(row, min(k, int(eligible.sum()))).indices
        chosen.update((int(i), None) for i in top if row[i] > 0)
    return list(chosen)


def plan_round(
    strategy: str, scores: torch.Tensor, train_labels: torch.Tensor, predicted: torch.Tensor,
    reviewer: torch.Tensor, k: int, eligible: torch.Tensor, train_probs: torch.Tensor, min_confidence: float,
    reinforce_k: int = 0,
) -> Plan:
    """One round's plan for the still-wrong queries: `scores` [Q, N] at their reviewer labels
    `reviewer` [Q], wrong predictions `predicted` [Q]; `train_labels` [N] current (edited) labels;
    `eligible` bool [N] examples that may be selected; `train_probs` [N, C] model probabilities;
    `reinforce_k` (relabel only): add each query's most helpful examples, at their labels."""
    unfit = train_probs.argmax(dim=1) != train_labels  # [N]
    if strategy == "reinforce":
        # grad-dot-like scores rank large-gradient examples first, mostly ones the model does not
        # fit (label noise); descending on those taught the noise (-25 to -50 held-out points on
        # digits), so only examples the model fits are reinforced
        chosen = top_per_query(scores, k, eligible & ~unfit, helpful=True)
        return Plan(descend=tuple(chosen), descend_labels=tuple(int(train_labels[i]) for i in chosen))
    if strategy == "unlearn":
        return Plan(ascend=tuple(top_per_query(scores, k, eligible, helpful=False)))
    # relabel: an example the model fits is most likely labelled right, whatever its influence
    found = harmful_label_matches(scores, train_labels, predicted, k, eligible & unfit)
    relabels = {}
    for i, evidence in found.items():
        label, _ = propose_label(evidence, reviewer, int(train_labels[i]), train_probs[i], min_confidence)
        if label is not None:
            relabels[i] = label
    helpful = [i for i in top_per_query(scores, reinforce_k, eligible & ~unfit, helpful=True) if i not in relabels] \
        if reinforce_k else []
    descend = tuple(relabels) + tuple(helpful)
    labels = tuple(relabels.values()) + tuple(int(train_labels[i]) for i in helpful)
    return Plan(descend=descend, descend_labels=labels, relabels=relabels)
