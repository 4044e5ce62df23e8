"""The stages of one influence computation, in order: fit_curvature -> precondition the queries'
gradients -> stream the training gradients against them (or against themselves for
self-influence). `influence_scores` / `self_influence` in __init__ are thin wrappers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from audit.errors import InvalidInput, NumericalError
from audit.influence import cache
from audit.influence.batches import dataset_size
from audit.influence.config import InfluenceConfig
from audit.influence.context import Context, evaluation, make_context
from audit.influence.curvature import Curvature, EigenCurvature, resolve_damping
from audit.influence.curvature.arnoldi import fit_arnoldi
from audit.influence.curvature.exact import MatrixCurvature, fit_exact
from audit.influence.curvature.kfac import KroneckerCurvature, fit_kronecker
from audit.influence.params import ParamFilter, select_params
from audit.influence.tracin import Checkpoints, check_checkpoint, load_checkpoints

Preconditioner = Callable[[torch.Tensor], torch.Tensor]  # [B, P] -> [B, P], same dtype


@dataclass(frozen=True)
class InfluenceResult:
    """Scores with what produced them: `damping` is the value used (None for tracin / gradcos);
    `gradient_path` how per-example gradients were vectorised (see audit.influence.gradients)."""

    scores: torch.Tensor  # [Q, N] influence or [N] self-influence
    damping: float | None
    config: InfluenceConfig
    gradient_path: str | None = None


def fit_curvature(ctx: Context, train: Dataset, n: int, cache_dir=None) -> Curvature:
    """The method's damping-free curvature of the mean training loss, from `cache_dir` when cached."""
    method = ctx.config.method
    key = cache.curvature_key(ctx, train) if cache_dir is not None else None
    state = cache.load(cache_dir, method, key) if key is not None else None
    if state is not None:
        if method in ("kfac", "ekfac"):
            return KroneckerCurvature.from_state(state, ctx.space)
        if "matrix" in state:
            return MatrixCurvature.from_state(state)
        return EigenCurvature.from_state(state)
    if method == "exact":
        curvature = fit_exact(ctx, train, n)
    elif method == "arnoldi":
        curvature = fit_arnoldi(ctx, train, n)
    else:
        curvature = fit_kronecker(ctx, train, n, corrected=method == "ekfac")
    if key is not None:
        cache.save(cache_dir, method, key, curvature.state())
    return curvature


def _unit(g: torch.Tensor) -> torch.Tensor:
    return g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)


def preconditioner(ctx: Context, train: Dataset, n: int, cache_dir) -> tuple[Preconditioner, float | None]:
    """g -> (C + damping I)^-1 g for the configured method, and the damping it uses."""
    cfg = ctx.config
    if cfg.method == "graddot":
        damping = cfg.damping or 1.0
        return (lambda g: g / damping), damping
    if cfg.method == "gradcos":
        return _unit, None
    curvature = fit_curvature(ctx, train, n, cache_dir)
    damping = resolve_damping(curvature, cfg.damping, cfg.damping_scale)
    return (lambda g: curvature.apply(g, damping)), damping


def query_side(ctx: Context, queries: Dataset, precondition: Preconditioner) -> torch.Tensor:
    """Preconditioned query gradients [Q, P]."""
    parts = [precondition(ctx.grads.loss_grads(x, y)) for x, y in ctx.batches(queries, "queries: gradients")]
    return torch.cat(parts)


def train_side(ctx: Context, train: Dataset, left: torch.Tensor, n: int) -> torch.Tensor:
    """left [Q, P] against every training gradient: [Q, N] in the model's dtype."""
    out = torch.empty(left.shape[0], n, dtype=left.dtype, device=ctx.device)
    start = 0
    for x, y in ctx.batches(train, "train: scores"):
        g = ctx.grads.loss_grads(x, y)  # [B, P]
        if ctx.config.method == "gradcos":
            g = _unit(g)
        out[:, start : start + len(y)] = left @ g.T  # [Q, B]
        start += len(y)
    return out


def self_side(ctx: Context, train: Dataset, precondition: Preconditioner, n: int) -> torch.Tensor:
    """g_i . precondition(g_i) for every training example: [N] in the model's dtype."""
    out = torch.empty(n, dtype=ctx.dtype, device=ctx.device)
    start = 0
    for x, y in ctx.batches(train, "train: self-influence"):
        g = ctx.grads.loss_grads(x, y)
        out[start : start + len(y)] = (g * precondition(g)).sum(1)
        start += len(y)
    return out


def _check_compatible(train: Dataset, queries: Dataset) -> None:
    (xt, _), (xq, _) = train[0], queries[0]
    if isinstance(xt, dict) != isinstance(xq, dict):
        raise InvalidInput("train and queries must both yield tensors or both yield dicts of tensors.")
    if isinstance(xt, dict):
        if set(xt) != set(xq):
            raise InvalidInput(f"train and query inputs have different keys: {sorted(xt)} vs {sorted(xq)}.")
    elif tuple(xt.shape) != tuple(xq.shape):
        raise InvalidInput(
            f"Query inputs have shape {tuple(xq.shape)} but training inputs {tuple(xt.shape)}; "
            "queries must be prepared like the training data."
        )


def _finish(scores: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    if not torch.isfinite(scores).all():
        raise NumericalError(
            f"{what} contain NaN or inf; check the model's loss on these examples or raise damping."
        )
    return scores.to(dtype).cpu()


def _tracin(
    model, train, queries, config, device, progress, param_filter, checkpoints, n
) -> tuple[torch.Tensor, torch.dtype, str | None]:
    total = None
    for state, lr in load_checkpoints(checkpoints):
        with evaluation(model):
            space = select_params(model, param_filter)
            check_checkpoint(state, space.names, space.shapes)
            ctx = make_context(model, train, config, device, progress, param_filter, params=state)
            ident = lambda g: g  # noqa: E731
            if queries is None:
                part = self_side(ctx, train, ident, n)
            else:
                part = train_side(ctx, train, query_side(ctx, queries, ident), n)
        total = lr * part if total is None else total + lr * part
    return total, ctx.dtype, ctx.grads.path


def compute(
    model: nn.Module,
    train: Dataset,
    queries: Dataset | None,
    config: InfluenceConfig,
    device=None,
    cache_dir=None,
    progress: bool = True,
    param_filter: ParamFilter = None,
    checkpoints: Checkpoints | None = None,
) -> InfluenceResult:
    """Influence [Q, N] of every training example on every query (queries=None: self-influence [N])."""
    if not isinstance(model, nn.Module):
        raise InvalidInput(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    n = dataset_size(train, "train")
    if queries is not None:
        dataset_size(queries, "queries")
        _check_compatible(train, queries)
    elif config.method == "gradcos":
        raise InvalidInput(
            "Self-influence with method='gradcos' is 1 for every example; use 'graddot' or a curvature method."
        )
    what = "Influence scores" if queries is not None else "Self-influence scores"
    if config.method == "tracin":
        scores, dtype, path = _tracin(model, train, queries, config, device, progress, param_filter, checkpoints, n)
        return InfluenceResult(_finish(scores, dtype, what), None, config, path)
    with evaluation(model):
        ctx = make_context(model, train, config, device, progress, param_filter)
        precondition, damping = preconditioner(ctx, train, n, cache_dir)
        if queries is None:
            scores = self_side(ctx, train, precondition, n)
        else:
            scores = train_side(ctx, train, query_side(ctx, queries, precondition), n)
    return InfluenceResult(_finish(scores, ctx.dtype, what), damping, config, ctx.grads.path)
