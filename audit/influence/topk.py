"""Top-k proponents (most helpful) and opponents (most harmful) per query, for the audit tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from audit.errors import InvalidInput


@dataclass(frozen=True)
class TopInfluences:
    """Per query q (row) and rank r (column, 0-based; `ranks` holds r + 1):

    proponents[q, r]: index of the training example with the (r+1)-th largest score (helpful:
        up-weighting it lowers q's loss), `proponent_scores[q, r]` its score;
    opponents[q, r]: index with the (r+1)-th smallest score (harmful), `opponent_scores[q, r]`.
    All tensors are [Q, k]. When fewer than k scores of a sign exist, the lists run into scores of
    the other sign; filter on the score's sign if only strictly helpful/harmful examples matter.
    """

    proponents: torch.Tensor  # [Q, k] int64
    proponent_scores: torch.Tensor  # [Q, k]
    opponents: torch.Tensor  # [Q, k] int64
    opponent_scores: torch.Tensor  # [Q, k]
    ranks: torch.Tensor  # [Q, k] int64, 1..k

    def head(self, k: int) -> TopInfluences:
        """The first `k` ranks of every query (all of them when k is larger)."""
        return TopInfluences(self.proponents[:, :k], self.proponent_scores[:, :k], self.opponents[:, :k],
                             self.opponent_scores[:, :k], self.ranks[:, :k])

    def queries(self, rows: slice) -> TopInfluences:
        """The queries at `rows`."""
        return TopInfluences(self.proponents[rows], self.proponent_scores[rows], self.opponents[rows],
                             self.opponent_scores[rows], self.ranks[rows])

    @staticmethod
    def stack(parts: list[TopInfluences]) -> TopInfluences:
        """The queries of `parts` in order (blocks of queries ranked separately, same k)."""
        return TopInfluences(*(torch.cat([getattr(p, f) for p in parts]) for f in
                               ("proponents", "proponent_scores", "opponents", "opponent_scores", "ranks")))

    def records(
        self, query_ids: list[str] | None = None, train_ids: list[str] | None = None
    ) -> list[dict[str, object]]:
        """Rows `{query_id, train_id, rank, score, role}` (role "helpful" or "harmful"), proponents
        first, ready for a DataFrame. Ids default to positions."""
        rows = []
        for role, idx, scores in (
            ("helpful", self.proponents, self.proponent_scores),
            ("harmful", self.opponents, self.opponent_scores),
        ):
            for q in range(idx.shape[0]):
                for r in range(idx.shape[1]):
                    i = int(idx[q, r])
                    rows.append(
                        {
                            "query_id": query_ids[q] if query_ids is not None else q,
                            "train_id": train_ids[i] if train_ids is not None else i,
                            "rank": r + 1,
                            "score": float(scores[q, r]),
                            "role": role,
                        }
                    )
        return rows


def top_influences(scores: torch.Tensor, k: int) -> TopInfluences:
    """The k most positive (proponents) and k most negative (opponents) training examples of each
    query in `scores` [Q, N] (k is capped at N). Ties keep the lower index first."""
    if scores.dim() != 2 or scores.shape[1] == 0:
        raise InvalidInput(
            f"scores must be a [queries, train] matrix with at least one column; got shape {tuple(scores.shape)}."
        )
    if k < 1:
        raise InvalidInput(f"k must be >= 1; got {k}.")
    if not torch.isfinite(scores).all():
        raise InvalidInput("scores contain NaN or inf; recompute them (or raise damping) before ranking.")
    k = min(k, scores.shape[1])
    # stable sorts make the order deterministic under ties
    order_desc = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # [Q, k]
    order_asc = torch.sort(scores, dim=1, stable=True).indices[:, :k]  # [Q, k]
    ranks = torch.arange(1, k + 1, device=scores.device).expand(scores.shape[0], k).clone()
    return TopInfluences(
        order_desc,
        torch.gather(scores, 1, order_desc),
        order_asc,
        torch.gather(scores, 1, order_asc),
        ranks,
    )


class StreamingTop:
    """`top_influences` of a [Q, N] score matrix that arrives in column chunks, in order, holding
    only [Q, 2k] scores at a time: `add(chunk)` for each [Q, r] chunk, then `result()`. Gives the
    same indices as `top_influences` of the whole matrix, ties included."""

    def __init__(self, k: int):
        if k < 1:
            raise InvalidInput(f"k must be >= 1; got {k}.")
        self.k = k
        self.seen = 0
        self._best: list[tuple[torch.Tensor, torch.Tensor]] = []  # (scores, indices) per side

    def add(self, chunk: torch.Tensor) -> None:
        """Fold in the next columns [Q, r] of the score matrix."""
        if not torch.isfinite(chunk).all():
            raise InvalidInput("scores contain NaN or inf; recompute them (or raise damping) before ranking.")
        idx = torch.arange(self.seen, self.seen + chunk.shape[1], device=chunk.device).expand(chunk.shape[0], -1)
        self.seen += chunk.shape[1]
        self._fold(((chunk, idx), (chunk, idx)))

    def add_top(self, part: TopInfluences, offset: int) -> None:
        """Fold in the top of the next block of columns, found separately (`part`, its indices
        local to the block, which starts at column `offset`): blocks in column order, each at most
        once. The top k of the whole matrix is the top k of its blocks' tops."""
        self._fold(((part.proponent_scores, part.proponents + offset),
                    (part.opponent_scores, part.opponents + offset)))

    def _fold(self, candidates) -> None:
        sides = []
        for side, descending in enumerate((True, False)):
            scores, indices = candidates[side]
            if self._best:
                # earlier columns first: a stable sort then keeps the lower index first under ties
                scores = torch.cat([self._best[side][0], scores], dim=1)
                indices = torch.cat([self._best[side][1], indices], dim=1)
            order = torch.sort(scores, dim=1, descending=descending, stable=True).indices[:, : self.k]
            sides.append((torch.gather(scores, 1, order), torch.gather(indices, 1, order)))
        self._best = sides

    def result(self) -> TopInfluences:
        if not self._best:
            raise InvalidInput("No scores were added; the training set is empty.")
        (pro_s, pro_i), (opp_s, opp_i) = self._best
        q, k = pro_i.shape
        ranks = torch.arange(1, k + 1, device=pro_i.device).expand(q, k).clone()
        return TopInfluences(pro_i, pro_s, opp_i, opp_s, ranks)
