"""Scoring against a built index: queries' projected gradients, preconditioned once, against the
stored training rows in chunks; top-k kept as the chunks stream by, or the dense [Q, N] matrix
when the caller asks for it (small N).

Sign and scale as in the engine (DESIGN.md): S[q, i] = g_q^T (C + damping I)^-1 g_i in the
projected space, > 0 when up-weighting training example i lowers query q's loss (helpful), per
unit weight in the mean training loss.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from audit.errors import InvalidInput, NumericalError
from audit.influence.batches import collate, dataset_size, ordered_batches, to_device
from audit.influence.gradients import loss_cotangents
from audit.influence.index.build import BuildStats, model_context, model_key
from audit.influence.index.cluster import ShardMap, local_map
from audit.influence.index.config import IndexConfig
from audit.influence.index.curvature import ProjectedCurvature, apply_blocks
from audit.influence.index.projection import Projector, indexed_layers
from audit.influence.index.store import IndexFolder, ShardMeta
from audit.influence.index.sums import ShardSums
from audit.influence.topk import StreamingTop, TopInfluences
from audit.text_classifier import padding_token

CHUNK_ROWS = 8192  # training rows scored per matmul: [Q, 8192] scores and [8192, D] rows in memory


@dataclass(frozen=True)
class GradientIndex:
    """A built index for one training set (see build_index). `n` rows in training-set order."""

    folder: IndexFolder
    data_digest: str
    shards: tuple[ShardMeta, ...]
    config: IndexConfig
    sums: ShardSums = field(repr=False, compare=False)  # the curvature statistics of every shard, summed
    header: dict
    stats: BuildStats | None = field(default=None, compare=False)

    @staticmethod
    def open(folder: IndexFolder | str | Path, data_digest: str, config: IndexConfig) -> GradientIndex:
        """The index of training set `data_digest` in `folder`, its curvature statistics summed from its shards.
        `config` supplies the query-time options (damping); its stored options must match."""
        folder = folder if isinstance(folder, IndexFolder) else IndexFolder(Path(folder))
        header = folder.header()
        if header["config"] != config.key():
            raise InvalidInput(f"The index in {folder.folder} was built with other options "
                               f"({header['config']}) than {config.key()}.")
        shards = folder.read_data(data_digest)
        if shards is None:
            raise InvalidInput(f"The index in {folder.folder} holds no training set {data_digest}; build it first.")
        sums = None
        for shard in shards:
            stored = folder.shard_meta(shard.digest)
            if stored is None:
                raise InvalidInput(f"Shard {shard.digest} of the index in {folder.folder} is missing; rebuild it.")
            sums = stored[1] if sums is None else sums + stored[1]
        return GradientIndex(folder, data_digest, tuple(shards), config, sums, header)

    @cached_property
    def curvature(self) -> ProjectedCurvature:
        """The configured curvature of the mean training loss, fitted from the summed statistics on
        first use (a query-time choice: building stops at the sums)."""
        return ProjectedCurvature.fit(self.sums, self.n, self.config.curvature)

    @property
    def n(self) -> int:
        """Training examples indexed."""
        return sum(s.rows for s in self.shards)

    @property
    def dim(self) -> int:
        """Columns of a row (projected dimensions, all layers)."""
        return sum(self.header["blocks"])

    @property
    def damping(self) -> float:
        """The damping queries use (the configured one, or damping_scale x the mean eigenvalue)."""
        return self.curvature.damping(self.config.damping, self.config.damping_scale)

    def rows(self, verify: bool = False) -> Iterator[torch.Tensor]:
        """The stored training rows in order, float32 chunks [<= CHUNK_ROWS, D] read from disk
        (memory-mapped: the whole index is never in memory). `verify`: check each shard's SHA-256."""
        for shard in self.shards:
            yield from _chunks(self.folder, shard, verify)

    def _offsets(self) -> list[int]:
        return np.cumsum([0] + [s.rows for s in self.shards[:-1]]).tolist()

    def query_gradients(self, model: nn.Module, queries: Dataset, device=None, stale_ok: bool = False
                        ) -> torch.Tensor:
        """Projected loss gradients [Q, D] (float64) of `queries` at their labels, for `model`.

        The model must be the one indexed (same parameters) unless `stale_ok`: repairs re-score
        a model a few steps away from the indexed one against the index (short horizon)."""
        q = dataset_size(queries, "queries")
        names = set(self.header["params"])
        with model_context(model, queries, self.config, device, False, lambda n, p: n in names) as ctx:
            if not stale_ok and model_key(ctx, self.config) != self.header["model_key"]:
                raise InvalidInput("This gradient index was built for other model parameters; build the index for "
                                   "this model (or pass stale_ok=True to score a model a few steps away from it).")
            projector = Projector(ctx, indexed_layers(model, ctx), self.folder.projections())
            inputs, labels = collate([queries[i] for i in range(q)])
            ctx.check_labels(labels)
            out = torch.empty(q, projector.dim, dtype=torch.float64)
            batch_size = self.config.batch_size or projector.auto_batch_size(inputs)
            for pos, x, y in ordered_batches(inputs, labels, batch_size, padding_token(model)):
                x, y = to_device(x, ctx.device), y.to(ctx.device)
                step = projector(x, lambda z, y=y: loss_cotangents(z, y).transpose(0, 1))
                out[pos] = step.gradients[0].cpu().double()
        return out

    def preconditioned(self, gradients: torch.Tensor) -> torch.Tensor:
        """(C + damping I)^-1 g for projected gradients [Q, D]: float32 [Q, D]."""
        inverses = self.curvature.inverse(self.damping, torch.float64)
        return apply_blocks(gradients.double(), inverses).float()

    def scores_of(self, preconditioned: torch.Tensor, shard_map: ShardMap | None = None) -> torch.Tensor:
        """Dense scores [b, N] (float32) of already preconditioned query rows [b, D] (from
        `preconditioned`), one pass over the stored rows: score a large batch a block at a time.
        `shard_map` (audit.influence.index.cluster): where the per-shard jobs run (default here)."""
        run = shard_map or local_map
        out = torch.cat(run(shard_scores, self.shards, folder=str(self.folder.folder), left=preconditioned.float()),
                        dim=1)
        return _finite(out, "Influence scores")

    def scores(self, model: nn.Module, queries: Dataset, device=None, stale_ok: bool = False) -> torch.Tensor:
        """Dense influence scores [Q, N] (float32) of every indexed example on every query. Holds
        [Q, N] in memory: for large N, use `top`."""
        return self.scores_of(self.preconditioned(self.query_gradients(model, queries, device, stale_ok)))

    def top(self, model: nn.Module, queries: Dataset, k: int, device=None, stale_ok: bool = False,
            shard_map: ShardMap | None = None) -> TopInfluences:
        """The k most helpful and k most harmful indexed examples per query, streamed: memory
        O(Q x (k + CHUNK_ROWS)) whatever N. Same result as `top_influences(self.scores(...), k)`.
        Each shard's top k is found by its own job (`shard_map`, default here), then merged in
        shard order."""
        top = StreamingTop(min(k, self.n))
        left = self.preconditioned(self.query_gradients(model, queries, device, stale_ok))
        parts = (shard_map or local_map)(shard_top, self.shards, folder=str(self.folder.folder), left=left, k=top.k)
        for offset, part in zip(self._offsets(), parts, strict=True):
            top.add_top(part, offset)
        return top.result()

    def self_influence(self, shard_map: ShardMap | None = None) -> torch.Tensor:
        """g_i^T (C + damping I)^-1 g_i of every indexed example: [N] float32, >= 0, from the stored
        rows alone (no model pass). `shard_map`: where the per-shard jobs run (default here)."""
        inverses = self.curvature.inverse(self.damping, torch.float32)
        parts = (shard_map or local_map)(shard_self_influence, self.shards, folder=str(self.folder.folder),
                                         inverses=inverses)
        return _finite(torch.cat(parts), "Self-influence scores")

    def describe(self) -> dict:
        """What a reader of an audit needs to know about the index it used (JSON-ready)."""
        return {"folder": str(self.folder.folder), "rows": self.n, "dim": self.dim, "damping": self.damping,
                "config": json.loads(self.config.key()), "shards": len(self.shards),
                "metadata": self.header.get("metadata", {})}


def _chunks(folder: IndexFolder, shard: ShardMeta, verify: bool = False) -> Iterator[torch.Tensor]:
    stored = folder.open_rows(shard, verify)
    for start in range(0, shard.rows, CHUNK_ROWS):
        # a copy (np.array): torch wants writable memory, and the memmap is read-only
        yield torch.from_numpy(np.array(stored[start : start + CHUNK_ROWS], dtype=np.float32))


def shard_scores(shard: ShardMeta, *, folder: str, left: torch.Tensor) -> torch.Tensor:
    """Job: scores [Q, rows] of preconditioned query rows `left` [Q, D] against one stored shard."""
    return torch.cat([left @ chunk.T for chunk in _chunks(IndexFolder(Path(folder)), shard)], dim=1)


def shard_top(shard: ShardMeta, *, folder: str, left: torch.Tensor, k: int) -> TopInfluences:
    """Job: the top `k` (capped at the shard's rows) of each query within one shard, indices local
    to the shard (StreamingTop.add_top merges them)."""
    top = StreamingTop(min(k, shard.rows))
    for chunk in _chunks(IndexFolder(Path(folder)), shard):
        top.add(left @ chunk.T)
    return top.result()


def shard_self_influence(shard: ShardMeta, *, folder: str, inverses: list[torch.Tensor]) -> torch.Tensor:
    """Job: self-influence [rows] of one stored shard's examples."""
    return torch.cat([(apply_blocks(chunk, inverses) * chunk).sum(1) for chunk in _chunks(IndexFolder(Path(folder)),
                                                                                          shard)])


def _finite(scores: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(scores).all():
        raise NumericalError(f"{what} contain NaN or inf; check the model's loss on these examples or raise damping.")
    return scores
