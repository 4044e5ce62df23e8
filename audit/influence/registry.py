"""The influence methods, by name. Each method is one module in `audit/influence/methods/` that
registers one `InfluenceMethod`; the engine and `InfluenceConfig` look the configured name up here
and never branch on it.

A method is described by what differs between methods:
- `precondition(ctx, curvature) -> (apply, damping)`: the map g -> (C + damping I)^-1 g applied to
  query gradients (and to g_i for self-influence), with the damping it used (None when it has none);
- `fit(ctx, train, n) -> curvature`, when it needs one fitted on the training data (damping-free,
  so one fit serves every damping), and `restore(state, ctx) -> curvature` to rebuild it from the
  `state()` stored by `cache_dir` (no restore: the curvature is never cached);
- flags: training gradients normalised to unit length (gradcos), summed over the training run's
  checkpoints (tracin), self-influence defined, curvature="hessian" accepted.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from audit.errors import InvalidInput
from audit.influence.curvature import Curvature, resolve_damping

if TYPE_CHECKING:  # context imports config, which imports this module
    from audit.influence.context import Context

Preconditioner = Callable[[torch.Tensor], torch.Tensor]  # [B, P] -> [B, P], same dtype
Precondition = Callable[["Context", Curvature | None], tuple[Preconditioner, float | None]]
Fit = Callable[["Context", Dataset, int], Curvature]
Restore = Callable[[Mapping, "Context"], Curvature]

# The name becomes part of cache file names (curvature-<name>-<digest>.pt).
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class InfluenceMethod:
    """One influence method (see the module docstring for the contract of each field).

    Scores are S[q, i] = precondition(g_q) . t(g_i), self-influence s[i] = g_i . precondition(g_i),
    with t the unit normalisation when `unit_train_gradients`, else the identity; `needs_checkpoints`
    makes them sum_k lr_k x that score at checkpoint k (the context then runs at the checkpoint's
    parameters, and `precondition`/`fit` see that context)."""

    name: str
    precondition: Precondition
    fit: Fit | None = None
    restore: Restore | None = None
    unit_train_gradients: bool = False
    needs_checkpoints: bool = False
    self_influence: bool = True
    hessian: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise InvalidInput(
                f"An influence method's name must be lower-case letters, digits and '_', starting with a letter; "
                f"got {self.name!r}."
            )
        if self.restore is not None and self.fit is None:
            raise InvalidInput(f"Influence method {self.name!r} has `restore` but no `fit` to produce the state.")


_REGISTRY: dict[str, InfluenceMethod] = {}


@dataclass(frozen=True)
class Registration:
    """Handle returned by `register`: `remove()` (or leaving a `with` block) unregisters the method."""

    method: InfluenceMethod

    def remove(self) -> None:
        """Unregister the method; a no-op if it is no longer the one registered under its name."""
        if _REGISTRY.get(self.method.name) is self.method:
            del _REGISTRY[self.method.name]

    def __enter__(self) -> InfluenceMethod:
        return self.method

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register(method: InfluenceMethod) -> Registration:
    """Make `method` available as `method=<its name>` everywhere (InfluenceConfig, influence_scores,
    self_influence). Refuses a name that is already registered, so no method is silently replaced."""
    if not isinstance(method, InfluenceMethod):
        raise InvalidInput(f"register() takes an InfluenceMethod; got {type(method).__name__}.")
    if method.name in _REGISTRY:
        raise InvalidInput(f"Influence method {method.name!r} is already registered; remove it before re-registering.")
    _REGISTRY[method.name] = method
    return Registration(method)


def _builtins() -> None:
    # Importing the package registers the built-in methods; done lazily so that config.py (imported
    # by the method modules through context.py) can use the registry without an import cycle.
    importlib.import_module("audit.influence.methods")


def methods() -> tuple[InfluenceMethod, ...]:
    """Every registered method, in registration order (the built-ins first, the default first)."""
    _builtins()
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    """Names of every registered method, in registration order."""
    return tuple(m.name for m in methods())


def find(name: str) -> InfluenceMethod | None:
    """The method registered as `name`, or None (also for a name that is not a string)."""
    _builtins()
    return _REGISTRY.get(name) if isinstance(name, str) else None


def lookup(name: str) -> InfluenceMethod:
    """The method registered as `name`; InvalidInput naming the registered ones otherwise."""
    method = find(name)
    if method is None:
        raise InvalidInput(f"Unknown influence method {name!r}; registered methods are {names()}.")
    return method


def damped(ctx: Context, curvature: Curvature | None) -> tuple[Preconditioner, float]:
    """`precondition` of curvature methods: g -> (C + damping I)^-1 g with the configured damping,
    or `damping_scale` x the curvature's mean eigenvalue when it is None."""
    if curvature is None:
        raise InvalidInput("A damped-curvature method needs `fit`; this one was registered without it.")
    damping = resolve_damping(curvature, ctx.config.damping, ctx.config.damping_scale)
    return (lambda g: curvature.apply(g, damping)), damping


def identity(ctx: Context, curvature: Curvature | None) -> tuple[Preconditioner, None]:
    """`precondition` of methods without curvature or damping: g -> g."""
    return (lambda g: g), None


def unit_rows(g: torch.Tensor) -> torch.Tensor:
    """Rows of g [B, P] scaled to unit length (zero rows stay zero): the normalisation applied to
    training gradients of methods with `unit_train_gradients`."""
    return g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
