"""A training-gradient index: built once per model state and training set, queried in seconds.

    from audit.influence.index import IndexConfig, build_index
    index = build_index(model, train, "cache/index", IndexConfig(rank_in=16, rank_out=16))
    top = index.top(model, flagged, k=10)        # streamed over the stored rows: TopInfluences
    S = index.scores(model, flagged)             # dense [Q, N] when N is small
    s = index.self_influence()                   # [N], from the stored rows alone

Each training example is stored as its loss gradient over the selected Linear/Conv2d layers,
projected per layer with a Kronecker-structured random projection (projection.py; the full
per-example gradient is never formed). The curvature is the damped Gauss-Newton matrix of the
mean training loss in that projected space, block-diagonal over layers (curvature.py), fitted
on first query from statistics summed in the same pass (sums.py). Queries are preconditioned
with it and scored against the rows chunk by chunk, keeping top-k (query.py). Sign and scale
as everywhere (DESIGN.md): > 0 helpful.

On disk (store.py): `<root>/<key>/`, the key covering the model's parameters and the options;
shards named by the digest of their examples, so a grown training set computes only its new
shards and an interrupted build resumes. What the projection gives up against the unprojected
methods is measured in bench/RESULTS.md and summarised in docs/influence.md.
"""

from audit.influence.index.build import BuildStats, build_index
from audit.influence.index.config import IndexConfig
from audit.influence.index.query import GradientIndex

__all__ = ["BuildStats", "GradientIndex", "IndexConfig", "build_index"]
