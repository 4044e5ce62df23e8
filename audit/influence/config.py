"""Options of one influence computation, validated in one place.

`InfluenceConfig` holds every option that changes the numbers (it is the cache key together with
the model and data digests); it collects all problems into a single `InvalidInput`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from audit.errors import InvalidInput
from audit.influence import registry


@dataclass(frozen=True)
class InfluenceConfig:
    """What to compute and how. Fields:

    method: a registered method (audit.influence.registry; the built-ins are METHODS).
    damping: lambda added to the curvature, > 0; None picks `damping_scale` x the mean eigenvalue
        of the fitted curvature (trace / P). graddot: scores are divided by it (None -> 1).
    damping_scale: factor of the mean eigenvalue used when damping is None, > 0.
    curvature: "gn" (Gauss-Newton = Fisher for cross-entropy, PSD) or "hessian" (true Hessian;
        methods registered with hessian=True only: exact and arnoldi).
    rank: arnoldi eigenpairs kept (top by magnitude), >= 1.
    iterations: arnoldi Krylov steps, >= rank; None -> min(P, 2 * rank).
    samples: training examples (seeded draw) the arnoldi curvature is estimated on; None -> all.
    fisher_samples: labels sampled per example for Gauss-Newton factors; None -> the exact
        expectation over all classes when there are <= max_exact_classes, else 1 sample.
    max_exact_classes: see fisher_samples, >= 2.
    max_exact_params: exact refuses models with more selected parameters (P x P matrix), >= 1.
    batch_size: examples per batch on every pass, >= 1; passes that form per-example gradients take
        fewer when batch_size x P values would exceed the memory bound (context.gradient_elements).
    query_block: queries scored per pass over the training data, >= 1. Memory holds query_block x P
        preconditioned query gradients (plus the [Q, N] scores) instead of Q x P; the training
        gradients are recomputed once per block, so time grows with ceil(Q / query_block).
        Q <= query_block: one pass, the cheapest.
    seed: seeds every random draw (arnoldi start vector and sample, sampled labels).
    grad_mode: per-example gradient vectorisation, "auto" | "vmap" | "batched".
    """

    method: str = "ekfac"
    damping: float | None = None
    damping_scale: float = 0.1
    curvature: str = "gn"
    rank: int = 64
    iterations: int | None = None
    samples: int | None = None
    fisher_samples: int | None = None
    max_exact_classes: int = 32
    max_exact_params: int = 10_000
    batch_size: int = 64
    query_block: int = 512
    seed: int = 0
    grad_mode: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        method = registry.find(self.method)
        if method is None:
            problems.append(f"method must be one of {registry.names()}, got {self.method!r}")
        if self.damping is not None and not self.damping > 0:
            problems.append(f"damping must be > 0 or None, got {self.damping}")
        if not self.damping_scale > 0:
            problems.append(f"damping_scale must be > 0, got {self.damping_scale}")
        if self.curvature not in ("gn", "hessian"):
            problems.append(f"curvature must be 'gn' or 'hessian', got {self.curvature!r}")
        if self.curvature == "hessian" and method is not None and not method.hessian:
            with_hessian = tuple(m.name for m in registry.methods() if m.hessian)
            problems.append(f"curvature='hessian' is available for the methods {with_hessian}, not {self.method!r}")
        if self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if self.iterations is not None and self.iterations < self.rank:
            problems.append(f"iterations must be >= rank ({self.rank}), got {self.iterations}")
        if self.samples is not None and self.samples < 1:
            problems.append(f"samples must be >= 1 or None, got {self.samples}")
        if self.fisher_samples is not None and self.fisher_samples < 1:
            problems.append(f"fisher_samples must be >= 1 or None, got {self.fisher_samples}")
        if self.max_exact_classes < 2:
            problems.append(f"max_exact_classes must be >= 2, got {self.max_exact_classes}")
        if self.max_exact_params < 1:
            problems.append(f"max_exact_params must be >= 1, got {self.max_exact_params}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.query_block, bool) or not isinstance(self.query_block, int) or self.query_block < 1:
            problems.append(f"query_block must be an integer >= 1, got {self.query_block!r}")
        if self.grad_mode not in ("auto", "vmap", "batched"):
            problems.append(f"grad_mode must be 'auto', 'vmap' or 'batched', got {self.grad_mode!r}")
        if problems:
            raise InvalidInput("Invalid influence options: " + "; ".join(problems) + ".")

    def curvature_key(self) -> str:
        """JSON of the fields the fitted curvature depends on (damping is applied afterwards)."""
        fields = asdict(self)
        for name in ("damping", "damping_scale", "batch_size", "query_block", "grad_mode"):
            fields.pop(name)
        return json.dumps(fields, sort_keys=True)
