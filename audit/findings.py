"""The audit's tables: which training examples drive each flagged prediction, and which look
mislabelled. Column names follow DESIGN.md's MLflow layout; sign convention as everywhere
(score > 0: helpful to the reviewer's label, score < 0: harmful)."""

from __future__ import annotations

import pandas as pd
import torch

from audit.examples import ExampleTable
from audit.influence import top_influences


def influence_table(
    scores: torch.Tensor, flagged: ExampleTable, predicted: torch.Tensor, train: ExampleTable, k: int
) -> pd.DataFrame:
    """Top-`k` helpful and top-`k` harmful training examples per flagged query.

    `scores` [Q, N] from `influence_scores` against the reviewer's labels; `predicted` [Q] the
    model's wrong predictions. Rows: query_id, train_id, rank (1 = strongest), score, role
    (helpful|harmful), query_label (reviewer's), predicted_label, train_label.
    """
    table = pd.DataFrame(top_influences(scores, k).records(list(flagged.ids), list(train.ids)))
    query_pos = {q: n for n, q in enumerate(flagged.ids)}
    train_pos = {t: n for n, t in enumerate(train.ids)}
    q = table["query_id"].map(query_pos).to_numpy()
    table["query_label"] = flagged.labels.numpy()[q]
    table["predicted_label"] = predicted.numpy()[q]
    table["train_label"] = train.labels.numpy()[table["train_id"].map(train_pos).to_numpy()]
    return table


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
