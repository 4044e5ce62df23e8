"""The audit's tables: which training examples drive each flagged prediction, and which look
mislabelled. Column names follow DESIGN.md's MLflow layout; sign convention as everywhere
(score > 0: helpful to the reviewer's label, score < 0: harmful)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from audit.errors import InvalidInput
from audit.examples import ExampleTable
from audit.influence import TopInfluences, top_influences
from audit.scoring import ScoreBlocks


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


ROLE_ORDER = {"helpful": 0, "harmful": 1}  # the order TopInfluences.records lists them in
REPORT_PER_SIDE = 4  # helpful and harmful examples per flagged example the report shows at most


@dataclass(frozen=True)
class AuditFindings:
    """Everything an audit reports: the tables it logs (`influence`, `self_influence`,
    `correction_candidates`), each flagged example's most helpful and most harmful training
    examples (`top`, at least REPORT_PER_SIDE per side; sign as above), and what they were
    computed on. `predicted` [Q] are the model's wrong predictions."""

    model_name: str
    model_version: str
    method: str
    flagged: ExampleTable
    predicted: torch.Tensor
    train: ExampleTable
    top: TopInfluences
    influence: pd.DataFrame
    self_influence: pd.DataFrame
    candidates: pd.DataFrame

    @property
    def n_relabel_candidates(self) -> int:
        return int((self.candidates["action"] == "relabel").sum()) if len(self.candidates) else 0


def build_findings(model: nn.Module, model_name: str, model_version: str, method: str, train: ExampleTable,
                   flagged: ExampleTable, predicted: torch.Tensor, scores: torch.Tensor | ScoreBlocks,
                   self_scores: torch.Tensor, top_k: int) -> AuditFindings:
    """The audit's findings from its scores: `scores` of `train` against `flagged` (at the
    reviewer's labels), [Q, N] or in blocks of flagged rows (ScoreBlocks: then no more than one
    block is ever in memory), `self_scores` [N], the model's wrong predictions `predicted` [Q];
    `top_k` helpful and harmful examples are kept per flagged example, and per correction proposal."""
    from audit.correction.candidates import candidates_from_evidence, relabel_evidence
    from audit.training import predict_logits

    blocks = scores if isinstance(scores, ScoreBlocks) else ScoreBlocks.dense(scores)
    if (blocks.n_queries, blocks.n_train) != (len(flagged), len(train)):
        raise InvalidInput(f"scores must have shape [flagged, train] = [{len(flagged)}, {len(train)}]; "
                           f"found [{blocks.n_queries}, {blocks.n_train}].")
    tables, tops, found = [], [], {}
    for start, block in blocks:
        rows = list(range(start, start + len(block)))
        tables.append(influence_table(block, flagged.subset(rows), predicted[rows], train, top_k))
        tops.append(top_influences(block, max(top_k, REPORT_PER_SIDE)))
        evidence = relabel_evidence(block, train.labels, flagged.labels[rows], predicted[rows], top_k, start)
        for i, votes in evidence.items():
            found.setdefault(i, []).extend(votes)
    # the model's probabilities only where a proposal needs them, not on the whole training set
    positions = sorted(found)
    probs = predict_logits(model, train.inputs[positions]).softmax(dim=1) if positions else None  # [F, C]
    candidates = candidates_from_evidence(found, train, flagged, self_scores,
                                          {i: probs[n] for n, i in enumerate(positions)})
    influence = pd.concat(tables, ignore_index=True)
    # every helpful row, then every harmful one, as one table of all the queries would list them
    influence = influence.iloc[np.argsort(influence["role"].map(ROLE_ORDER).to_numpy(), kind="stable")]
    return AuditFindings(model_name, model_version, method, flagged, predicted, train, TopInfluences.stack(tops),
                         influence.reset_index(drop=True), self_influence_table(self_scores, train), candidates)
