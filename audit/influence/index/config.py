"""Options of a gradient index, validated in one place (all problems in one `InvalidInput`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from audit.errors import InvalidInput

STORAGE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class IndexConfig:
    """How the index is built and queried. Fields:

    rank_in / rank_out: per Linear/Conv2d layer, the layer input (bias column included) is projected
        to `rank_in` dimensions and the output gradient to `rank_out`, so each layer contributes
        rank_out x rank_in columns. A side that has no more dimensions than its rank is kept as is
        (exact): a 2-class head is never projected on its output side.
    fisher_samples: labels sampled per example for the Gauss-Newton curvature; None -> the exact
        expectation over all classes when there are <= max_exact_classes, else 1 sample. Default 1:
        on the digits CNN exact (10 classes) cost 3x the build time (4-5x since one sample's
        build got cheaper, session 13) for a top-10 overlap with unprojected EK-FAC of 0.850 instead of
        0.846 (bench/RESULTS.md).
    max_exact_classes: see fisher_samples, >= 2.
    damping: lambda added to the projected curvature, > 0; None picks `damping_scale` x its mean
        eigenvalue (trace / D), the engine's rule applied in the projected space.
    damping_scale: see damping, > 0.
    curvature: "ekfac" (EK-FAC in the projected space, default) or "gn" (the full projected
        Gauss-Newton block per layer); see curvature.py. Chosen at query time.
    shard_rows: training examples per shard on disk; shards are the unit that is reused when the
        training data grows and that workers build independently.
    batch_size: examples per forward/backward pass while building or querying; None (default):
        sized per model (projection.auto_batch_size): a few hundred examples of a small CNN, 32
        sentences of a transformer. The numbers do not depend on it beyond round-off.
    storage: dtype of the stored gradients, "float32" or "float16" (half the disk, scores rounded
        to about 3 significant digits).
    seed: seeds the random projections and the sampled labels.
    """

    rank_in: int = 16
    rank_out: int = 16
    fisher_samples: int | None = 1
    max_exact_classes: int = 32
    damping: float | None = None
    damping_scale: float = 0.1
    curvature: str = "ekfac"
    shard_rows: int = 4096
    batch_size: int | None = None
    storage: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("rank_in", "rank_out", "shard_rows", "batch_size"):
            value = getattr(self, name)
            if name == "batch_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if self.fisher_samples is not None and (not isinstance(self.fisher_samples, int) or self.fisher_samples < 1):
            problems.append(f"fisher_samples must be an integer >= 1 or None, got {self.fisher_samples!r}")
        if self.max_exact_classes < 2:
            problems.append(f"max_exact_classes must be >= 2, got {self.max_exact_classes}")
        if self.damping is not None and not self.damping > 0:
            problems.append(f"damping must be > 0 or None, got {self.damping}")
        if not self.damping_scale > 0:
            problems.append(f"damping_scale must be > 0, got {self.damping_scale}")
        if self.curvature not in ("ekfac", "gn"):
            problems.append(f"curvature must be 'ekfac' or 'gn', got {self.curvature!r}")
        if self.storage not in STORAGE_DTYPES:
            problems.append(f"storage must be one of {STORAGE_DTYPES}, got {self.storage!r}")
        if problems:
            raise InvalidInput("Invalid gradient index options: " + "; ".join(problems) + ".")

    def key(self) -> str:
        """JSON of the fields the stored rows depend on (damping and curvature are chosen at query
        time and the batch size changes no number beyond round-off, so one index serves them all)."""
        fields = asdict(self)
        for name in ("damping", "damping_scale", "curvature", "batch_size"):
            fields.pop(name)
        return json.dumps(fields, sort_keys=True)
