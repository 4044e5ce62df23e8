"""Influence engine: which training examples are behind a model's behaviour on given queries.

    from audit.influence import influence_scores, self_influence, top_influences
    S = influence_scores(model, train, queries, method="ekfac")   # [len(queries), len(train)]
    s = self_influence(model, train, method="ekfac")              # [len(train)]
    top = top_influences(S, k=10)                                 # proponents / opponents per query

`train` / `queries` are map-style datasets of `(inputs, label)`; inputs a tensor (logits =
`model(x)`) or a dict of tensors (logits = `model(**x).logits`, or the tensor it returns; 1-D
sequences of different lengths are right-padded with 0, so pass an `attention_mask`).
The model runs in eval mode with detached copies of its parameters: its parameters, `.grad` and
train/eval modes are left as they were.

Definition, sign and scaling. With L_j the cross-entropy of example j, the curvature C is that of
the *mean* training loss (1/N) sum_j L_j at the current parameters:
    S[q, i] = g_q^T (C + damping I)^-1 g_i,    g = gradient of the loss at the example's label.
S[q, i] > 0: up-weighting training example i is predicted to LOWER the loss of query q (helpful);
< 0: harmful (DESIGN.md). The scale is per unit of example weight in the mean-loss objective
(S = -dL_q/d eps for objective (1/N) sum_j L_j + eps L_i), so removing example i changes L_q by
about S[q, i] / N. self_influence: s[i] = g_i^T (C + damping I)^-1 g_i >= 0 (for PSD curvature).
If the model was trained with L2 regularisation (weight decay) strength w on (w/2)|theta|^2,
damping=w makes C + damping I the exact curvature of that training objective.

damping=None picks 0.1 x the mean eigenvalue of the fitted curvature (trace(C) / P, the
kronfluence heuristic; `damping_scale` changes the 0.1). The trace is exact for exact, EK-FAC and
Gauss-Newton Arnoldi, estimated (Hutchinson) for Hessian Arnoldi. For graddot the scores are
g_q . g_i / damping (None -> 1); gradcos and tracin ignore damping.

Methods (`method=`):
- "ekfac" (default) / "kfac": Kronecker-factored Gauss-Newton per Linear/Conv2d layer, EK-FAC with
  eigenvalue correction; exact diagonal for other parameters (norms, embeddings).
- "arnoldi": top-`rank` eigenpairs of the Gauss-Newton (or Hessian) from Arnoldi iteration on
  `samples` training examples; directions outside that eigenspace are ignored (Schioppa et al.).
- "exact": explicit P x P curvature (P <= max_exact_params); the reference in tests. The damped
  Gauss-Newton matrix is solved by Cholesky, the Hessian eigendecomposed.
- "tracin": sum_k lr_k g_q(theta_k) . g_i(theta_k) over `checkpoints`.
- "graddot" / "gradcos": gradient dot product / cosine baselines.
METHODS lists these built-ins (NEEDS_CHECKPOINTS: tracin; NO_SELF_INFLUENCE: gradcos). Each is one
module in audit/influence/methods/ registering an `InfluenceMethod`; `register_method` adds another
(its handle's `remove()`, or a `with` block, takes it out again), see registry.py.
Curvature: "gn" (default, Gauss-Newton = Fisher, PSD) or "hessian" (exact, arnoldi). The true
Hessian is indefinite on trained networks and predicts retraining far worse (see DESIGN.md).
Extra options: see `InfluenceConfig` (rank, iterations, samples, fisher_samples, seed, ...),
`param_filter` (parameter subset: callable or name prefixes), `checkpoints` (tracin).
`cache_dir` stores fitted curvatures keyed by model, data and options.
Reusing a fit: `fitted = fit_influence_curvature(model, train, config)` fits once; passing
`fitted=fitted` to later computations (e.g. of the same model a few fine-tuning steps on) skips
their fit and uses it as it stands. Only the gradients are then at the current parameters: an
approximation valid over a short horizon (Schioppa et al. 2023), see `FittedCurvature`.
Queries are scored `query_block` (512) at a time: memory O(query_block x P + Q x N) however many
queries, at the price of one pass over the training data per block.

Per-example gradients run under torch.func.vmap. Hugging Face models refuse vmap only because
they inspect the 2-D attention mask, so they get it as the 4-D additive bias they accept ready-made
(after checking it gives the same logits); a model that still refuses falls back to a batched path
with the same numbers and more backward work. `InfluenceResult.gradient_path` says which ran.
"""

from __future__ import annotations

import os
from dataclasses import fields

import torch
from torch import nn
from torch.utils.data import Dataset

from audit.errors import InvalidInput
from audit.influence.config import InfluenceConfig
from audit.influence.engine import FittedCurvature, InfluenceResult, compute
from audit.influence.engine import fit as _fit
from audit.influence.methods import METHODS, NEEDS_CHECKPOINTS, NO_SELF_INFLUENCE
from audit.influence.params import ParamFilter
from audit.influence.registry import InfluenceMethod
from audit.influence.registry import register as register_method
from audit.influence.topk import TopInfluences, top_influences
from audit.influence.tracin import Checkpoints

__all__ = [
    "METHODS",
    "FittedCurvature",
    "NEEDS_CHECKPOINTS",
    "NO_SELF_INFLUENCE",
    "InfluenceConfig",
    "InfluenceMethod",
    "InfluenceResult",
    "TopInfluences",
    "influence_scores",
    "self_influence",
    "top_influences",
    "compute_influence",
    "fit_influence_curvature",
    "register_method",
]


def _config(method: str, damping: float | None, batch_size: int, options: dict[str, object]) -> InfluenceConfig:
    known = {f.name for f in fields(InfluenceConfig)} - {"method", "damping", "batch_size"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidInput(f"Unknown influence option(s) {unknown}; valid options are {sorted(known)}.")
    return InfluenceConfig(method=method, damping=damping, batch_size=batch_size, **options)  # type: ignore[arg-type]


def compute_influence(
    model: nn.Module,
    train: Dataset,
    queries: Dataset | None,
    config: InfluenceConfig = InfluenceConfig(),
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    param_filter: ParamFilter = None,
    checkpoints: Checkpoints | None = None,
    fitted: FittedCurvature | None = None,
) -> InfluenceResult:
    """Like `influence_scores` (queries=None: `self_influence`) with the options as one
    `InfluenceConfig`; the result also carries the damping actually used. `fitted`: a curvature from
    `fit_influence_curvature` with the same options, used instead of fitting (methods without a
    fit ignore it)."""
    return compute(model, train, queries, config, device, cache_dir, progress, param_filter, checkpoints, fitted)


def fit_influence_curvature(
    model: nn.Module,
    train: Dataset,
    config: InfluenceConfig = InfluenceConfig(),
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    param_filter: ParamFilter = None,
) -> FittedCurvature | None:
    """Fit `config.method`'s damping-free curvature on `train` at `model`'s current parameters,
    once, for `fitted=` of later computations with the same options and `param_filter`
    (refused otherwise). None for methods without a fit (graddot, gradcos): there is nothing to
    reuse, and passing None fits nothing. Reused at other parameters the curvature is stale; the
    scores are then an approximation valid over a short horizon (Schioppa et al. 2023)."""
    return _fit(model, train, config, device, cache_dir, progress, param_filter)


def influence_scores(
    model: nn.Module,
    train: Dataset,
    queries: Dataset,
    method: str = "ekfac",
    damping: float | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    param_filter: ParamFilter = None,
    checkpoints: Checkpoints | None = None,
    fitted: FittedCurvature | None = None,
    **options: object,
) -> torch.Tensor:
    """Influence of every training example on every query: [len(queries), len(train)], in the
    model's parameter dtype, on CPU. S[q, i] > 0: up-weighting train example i lowers query q's
    loss at q's label (per unit weight in the mean training loss; / N for leave-one-out).
    `options` are `InfluenceConfig` fields (curvature, rank, iterations, samples, seed, ...);
    `fitted`: a curvature to reuse instead of fitting (`fit_influence_curvature`, same options)."""
    config = _config(method, damping, batch_size, options)
    return compute(model, train, queries, config, device, cache_dir, progress, param_filter, checkpoints,
                   fitted).scores


def self_influence(
    model: nn.Module,
    train: Dataset,
    method: str = "ekfac",
    damping: float | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    param_filter: ParamFilter = None,
    checkpoints: Checkpoints | None = None,
    fitted: FittedCurvature | None = None,
    **options: object,
) -> torch.Tensor:
    """Self-influence g_i^T (C + damping I)^-1 g_i of every training example: [len(train)]; high
    values flag unusual, often mislabelled examples. Same options as `influence_scores`."""
    config = _config(method, damping, batch_size, options)
    return compute(model, train, None, config, device, cache_dir, progress, param_filter, checkpoints,
                   fitted).scores
