"""The audit's tables: which training examples drive each flagged prediction, and which look
mislabelled. Column names follow DESIGN.md's MLflow layout; sign convention as everywhere
(score > 0: helpful to the reviewer's label, score < 0: harmful)."""

from __future__ import annotations

import pandas as pd
import torch

from audit.examples import ExampleTable


def influence_table(
    scores: torch.Tensor, flagged: ExampleTable, predicted: torch.Tensor, train: ExampleTable, k: int
) -> pd.DataFrame:
    """Top-`k` helpful and top-`k` harmful training examples per flagged query.

    `scores` [Q, N] from `influence_scores` against the reviewer's labels; `predicted` [Q] the
    model's wrong predictions. Rows: query_id, query_label, predicted_label, train_id,
    train_label, role (helpful|harmful), rank (1 = strongest), score.
    """
    k = min(k, scores.shape[1])
    helpful = torch.topk(scores, k, dim=1)  # largest positive first, [Q, k]
    harmful = torch.topk(-scores, k, dim=1)  # most negative first, [Q, k]
    rows = []
    for q, query_id in enumerate(flagged.ids):
        for role, top, sign in (("helpful", helpful, 1.0), ("harmful", harmful, -1.0)):
            for rank, (i, s) in enumerate(zip(top.indices[q].tolist(), top.values[q].tolist()), start=1):
                rows.append(
                    {
                        "query_id": query_id,
                        "query_label": int(flagged.labels[q]),
                        "predicted_label": int(predicted[q]),
                        "train_id": train.ids[i],
                        "train_label": int(train.labels[i]),
                        "role": role,
                        "rank": rank,
                        "score": sign * s,
                    }
                )
    return pd.DataFrame(rows)


def self_influence_table(self_scores: torch.Tensor, train: ExampleTable) -> pd.DataFrame:
    """Every training example with its self-influence and rank (1 = most unusual), sorted by rank."""
    order = torch.argsort(self_scores, descending=True)
    return pd.DataFrame(
        {
            "train_id": [train.ids[i] for i in order.tolist()],
            "train_label": train.labels[order].numpy(),
            "self_influence": self_scores[order].numpy(),
            "rank": range(1, len(order) + 1),
        }
    )
