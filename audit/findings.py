"""The audit's tables: which training examples drive each flagged prediction, and which look
mislabelled. Column names follow DESIGN.md's MLflow layout; sign convention as everywhere
(score > 0: helpful to the reviewer's label, score < 0: harmful)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

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


@dataclass(frozen=True)
class AuditFindings:
    """Everything an audit reports: the tables it logs (`influence`, `self_influence`,
    `correction_candidates`), the scores behind them (`scores` [Q, N], sign as above), and what
    they were computed on. `predicted` [Q] are the model's wrong predictions."""

    model_name: str
    model_version: str
    method: str
    flagged: ExampleTable
    predicted: torch.Tensor
    train: ExampleTable
    scores: torch.Tensor
    influence: pd.DataFrame
    self_influence: pd.DataFrame
    candidates: pd.DataFrame

    @property
    def n_relabel_candidates(self) -> int:
        return int((self.candidates["action"] == "relabel").sum()) if len(self.candidates) else 0


def build_findings(model: nn.Module, model_name: str, model_version: str, method: str, train: ExampleTable,
                   flagged: ExampleTable, predicted: torch.Tensor, scores: torch.Tensor, self_scores: torch.Tensor,
                   top_k: int) -> AuditFindings:
    """The audit's findings from its scores: `scores` [Q, N] of `train` against `flagged` (at the
    reviewer's labels), `self_scores` [N], the model's wrong predictions `predicted` [Q]; `top_k`
    helpful and harmful examples are kept per flagged example, and per correction proposal."""
    from audit.correction import propose_corrections
    from audit.training import predict_logits

    train_probs = predict_logits(model, train.inputs).softmax(dim=1)  # [N, C]
    candidates = propose_corrections(scores, train, flagged, predicted, self_scores, k=top_k, train_probs=train_probs)
    return AuditFindings(model_name, model_version, method, flagged, predicted, train, scores,
                         influence_table(scores, flagged, predicted, train, top_k),
                         self_influence_table(self_scores, train), candidates)
