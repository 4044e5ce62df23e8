"""The stages of one influence computation, in order: look the method up in the registry -> fit its
curvature (or restore it from `cache_dir`) -> precondition the queries' gradients, one block of at
most `query_block` queries at a time -> stream the training gradients against each block (or against
themselves for self-influence). Checkpoint-summed methods run these stages at every checkpoint.
What differs between methods is in their `InfluenceMethod` (registry.py, methods/); nothing here
depends on a method's name. `influence_scores` / `self_influence` in __init__ are thin wrappers.

The fit can also run on its own (`fit`, public as `fit_influence_curvature`) and its result be
passed to later computations at other parameters, which then skip it (`FittedCurvature`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from audit.errors import InvalidInput, NumericalError
from audit.influence import cache, registry
from audit.influence.batches import dataset_size
from audit.influence.config import InfluenceConfig
from audit.influence.context import Context, evaluation, make_context
from audit.influence.curvature import Curvature
from audit.influence.params import ParamFilter, ParamSpace, select_params
from audit.influence.registry import InfluenceMethod, Preconditioner, unit_rows
from audit.influence.tracin import Checkpoints, check_checkpoint, load_checkpoints


@dataclass(frozen=True)
class InfluenceResult:
    """Scores with what produced them: `damping` is the value used (None for methods without one,
    such as tracin and gradcos); `gradient_path` how per-example gradients were vectorised (see
    audit.influence.gradients)."""

    scores: torch.Tensor  # [Q, N] influence or [N] self-influence
    damping: float | None
    config: InfluenceConfig
    gradient_path: str | None = None


@dataclass(frozen=True)
class FittedCurvature:
    """A method's damping-free curvature fitted once (by `fit`), for `compute(..., fitted=...)`.

    Contract: a computation given it skips the fit and preconditions with it as it stands, also at
    parameters other than those it was fitted at (a model a few fine-tuning steps further on).
    That is an approximation valid over a short horizon only (Schioppa et al. 2023: influence
    predicts a short stretch of training well); the gradients are always the current model's.
    damping=None still means `damping_scale` x the mean eigenvalue, of this fitted curvature, so
    every computation reusing it uses the same damping. It must come from the same method and
    curvature options (`key`) over the same parameter layout (`space`); `compute` refuses others.
    """

    method: str
    curvature: Curvature
    key: str  # InfluenceConfig.curvature_key() of the fit
    space: ParamSpace  # the selected parameters it covers (names and shapes)


def fit_curvature(method: InfluenceMethod, ctx: Context, train: Dataset, n: int, cache_dir=None) -> Curvature:
    """The damping-free curvature of the mean training loss that `method.fit` produces, restored
    from `cache_dir` when cached there (a method without `restore` is never cached)."""
    key = cache.curvature_key(ctx, train) if cache_dir is not None and method.restore is not None else None
    state = cache.load(cache_dir, method.name, key) if key is not None else None
    if state is not None:
        return method.restore(state, ctx)
    curvature = method.fit(ctx, train, n)
    if key is not None:
        cache.save(cache_dir, method.name, key, curvature.state())
    return curvature


def preconditioner(
    method: InfluenceMethod, ctx: Context, train: Dataset, n: int, cache_dir=None,
    fitted: FittedCurvature | None = None,
) -> tuple[Preconditioner, float | None]:
    """g -> (C + damping I)^-1 g for `method` at `ctx`'s parameters, and the damping it uses; with
    `fitted`, C is that curvature (no pass over the training data)."""
    if method.fit is None:
        curvature = None
    elif fitted is not None:
        _check_fitted(fitted, ctx)
        curvature = fitted.curvature
    else:
        curvature = fit_curvature(method, ctx, train, n, cache_dir)
    return method.precondition(ctx, curvature)


def _check_fitted(fitted: FittedCurvature, ctx: Context) -> None:
    if not isinstance(fitted, FittedCurvature):
        raise InvalidInput("fitted must be a FittedCurvature from fit_influence_curvature; "
                           f"got {type(fitted).__name__}.")
    if fitted.key != ctx.config.curvature_key():
        raise InvalidInput(f"The fitted curvature was made with other options ({fitted.key}) than this computation's "
                           f"({ctx.config.curvature_key()}); fit it with the same method and options.")
    if fitted.space != ctx.space:
        raise InvalidInput(f"The fitted curvature covers other parameters ({len(fitted.space.names)} tensors, "
                           f"P = {fitted.space.dim}) than this computation ({len(ctx.space.names)} tensors, "
                           f"P = {ctx.space.dim}); fit it with the same model layout and param_filter.")


def query_side(ctx: Context, queries: Dataset, precondition: Preconditioner, desc: str) -> torch.Tensor:
    """Preconditioned gradients [len(queries), P] of one block of queries, in the model's dtype."""
    left = None
    start = 0
    for x, y in ctx.batches(queries, desc):
        g = precondition(ctx.grads.loss_grads(x, y))  # [B, P]
        if left is None:
            # one buffer filled in place: torch.cat of the parts would hold every row twice
            left = g.new_empty(len(queries), g.shape[1])  # type: ignore[arg-type]
        left[start : start + len(y)] = g
        start += len(y)
    return left


def train_side(ctx: Context, train: Dataset, left: torch.Tensor, out: torch.Tensor, unit: bool, desc: str) -> None:
    """Write left [b, P] against every training gradient into out [b, N]; `unit`: the training
    gradients are scaled to unit length first."""
    start = 0
    for x, y in ctx.batches(train, desc):
        g = ctx.grads.loss_grads(x, y)  # [B, P]
        if unit:
            g = unit_rows(g)
        out[:, start : start + len(y)] = left @ g.T  # [b, B]
        start += len(y)


def query_scores(
    method: InfluenceMethod, ctx: Context, train: Dataset, queries: Dataset, precondition: Preconditioner, n: int
) -> torch.Tensor:
    """[Q, N] scores, the queries taken in blocks of at most `config.query_block`: memory
    O(block x P + Q x N), ceil(Q / block) passes over the training data (one when Q <= block)."""
    q, block = len(queries), ctx.config.query_block  # type: ignore[arg-type]
    out = torch.empty(q, n, dtype=ctx.dtype, device=ctx.device)
    for start in range(0, q, block):
        stop = min(start + block, q)
        part = queries if stop - start == q else Subset(queries, range(start, stop))
        label = "" if stop - start == q else f" (queries {start}-{stop - 1} of {q})"
        left = query_side(ctx, part, precondition, "queries: gradients" + label)
        train_side(ctx, train, left, out[start:stop], method.unit_train_gradients, "train: scores" + label)
        del left  # before the next block's gradients exist: one block alive at a time, not two
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


def _scores(
    method: InfluenceMethod, ctx: Context, train: Dataset, queries: Dataset | None, n: int, cache_dir,
    fitted: FittedCurvature | None = None,
) -> tuple[torch.Tensor, float | None]:
    precondition, damping = preconditioner(method, ctx, train, n, cache_dir, fitted)
    if queries is None:
        return self_side(ctx, train, precondition, n), damping
    return query_scores(method, ctx, train, queries, precondition, n), damping


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


def _at_checkpoints(
    method, model, train, queries, config, device, cache_dir, progress, param_filter, checkpoints, n
) -> tuple[torch.Tensor, float | None, Context]:
    """sum_k lr_k x the method's scores at checkpoint k; the damping when every checkpoint used the
    same one, else None."""
    total, dampings, ctx = None, set(), None
    for state, lr in load_checkpoints(checkpoints, method.name):
        with evaluation(model):
            space = select_params(model, param_filter)
            check_checkpoint(state, space.names, space.shapes)
            ctx = make_context(model, train, config, device, progress, param_filter, params=state)
            part, damping = _scores(method, ctx, train, queries, n, cache_dir)
        total = part.mul_(lr) if total is None else total.add_(part, alpha=lr)
        dampings.add(damping)
    return total, (dampings.pop() if len(dampings) == 1 else None), ctx


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
    fitted: FittedCurvature | None = None,
) -> InfluenceResult:
    """Influence [Q, N] of every training example on every query (queries=None: self-influence [N]).
    `fitted`: a FittedCurvature used instead of fitting one (see its contract); ignored by methods
    without a fit."""
    if not isinstance(model, nn.Module):
        raise InvalidInput(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    method = registry.lookup(config.method)
    if fitted is not None and method.fit is not None and method.needs_checkpoints:
        raise InvalidInput(f"method={method.name!r} fits a curvature at every checkpoint; it takes no fitted "
                           "curvature.")
    n = dataset_size(train, "train")
    if queries is not None:
        dataset_size(queries, "queries")
        _check_compatible(train, queries)
    elif not method.self_influence:
        able = tuple(m.name for m in registry.methods() if m.self_influence)
        raise InvalidInput(f"method={method.name!r} has no self-influence; use one of {able}.")
    what = "Influence scores" if queries is not None else "Self-influence scores"
    if method.needs_checkpoints:
        scores, damping, ctx = _at_checkpoints(
            method, model, train, queries, config, device, cache_dir, progress, param_filter, checkpoints, n
        )
    else:
        with evaluation(model):
            ctx = make_context(model, train, config, device, progress, param_filter)
            scores, damping = _scores(method, ctx, train, queries, n, cache_dir, fitted)
    return InfluenceResult(_finish(scores, ctx.dtype, what), damping, config, ctx.grads.path)


def fit(
    model: nn.Module,
    train: Dataset,
    config: InfluenceConfig,
    device=None,
    cache_dir=None,
    progress: bool = True,
    param_filter: ParamFilter = None,
) -> FittedCurvature | None:
    """The curvature `compute` would fit for `config` at `model`'s current parameters (restored
    from `cache_dir` when cached there), to pass to later computations; None for a method without
    a fit (nothing to reuse). Checkpoint-summed methods fit one per checkpoint and are refused."""
    if not isinstance(model, nn.Module):
        raise InvalidInput(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    method = registry.lookup(config.method)
    if method.fit is None:
        return None
    if method.needs_checkpoints:
        raise InvalidInput(f"method={method.name!r} fits a curvature at every checkpoint; there is no one curvature "
                           "to fit.")
    n = dataset_size(train, "train")
    with evaluation(model):
        ctx = make_context(model, train, config, device, progress, param_filter)
        curvature = fit_curvature(method, ctx, train, n, cache_dir)
    return FittedCurvature(method.name, curvature, config.curvature_key(), ctx.space)
