"""Which parameters influence is computed over, and the flat layout their gradients share.

Every gradient in the engine is a row of a flat [*, P] matrix; `ParamSpace` maps parameter names
to column slices of it. `model_state` gives the tensors `functional_call` runs the model with, on
the target device, detached from the user's model (its parameters and `.grad` stay untouched).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from audit.errors import InvalidInput

ParamFilter = Callable[[str, nn.Parameter], bool] | Iterable[str] | None


@dataclass(frozen=True)
class ParamSpace:
    """Selected parameters in model order: `names`, `shapes`, and their offsets into [P]."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, total = [], 0
        for n in self.sizes:
            out.append(total)
            total += n
        return tuple(out)

    @property
    def dim(self) -> int:
        """P, the number of scalar parameters selected."""
        return sum(self.sizes)

    def slice(self, name: str) -> slice:
        """Columns of parameter `name` in a flat [*, P] gradient."""
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i] + self.sizes[i])

    def flatten(self, tensors: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
        """Concatenate per-parameter tensors [*lead_dims, *shape] into [*lead_dims, P]."""
        first = tensors[self.names[0]]
        lead_shape = first.shape[:lead]
        return torch.cat([tensors[n].reshape(*lead_shape, -1) for n in self.names], dim=lead)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverse of `flatten` for one vector [P] -> {name: tensor of the parameter's shape}."""
        return {
            n: flat[o : o + k].reshape(s)
            for n, s, o, k in zip(self.names, self.shapes, self.offsets, self.sizes, strict=True)
        }


def select_params(model: nn.Module, param_filter: ParamFilter = None) -> ParamSpace:
    """Trainable parameters kept by `param_filter`: None keeps all with `requires_grad`; a callable
    `(name, param) -> bool` decides per parameter; an iterable of strings keeps parameters whose
    name equals or starts with one of them (e.g. `["head."]` or `["classifier", "bert.pooler"]`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if param_filter is None:
        keep = named
    elif callable(param_filter):
        keep = [(n, p) for n, p in named if param_filter(n, p)]
    else:
        prefixes = tuple(param_filter)
        if isinstance(param_filter, str) or not all(isinstance(s, str) for s in prefixes):
            raise InvalidInput(
                f"param_filter must be a callable or a list of parameter-name prefixes; got {param_filter!r}."
            )
        keep = [(n, p) for n, p in named if n.startswith(prefixes)]
    if not keep:
        raise InvalidInput(
            "No trainable parameter was selected for influence; check param_filter against "
            f"model.named_parameters() (first names: {[n for n, _ in named[:5]]})."
        )
    return ParamSpace(tuple(n for n, _ in keep), tuple(p.shape for _, p in keep))


def model_state(
    model: nn.Module, space: ParamSpace, device: torch.device, params: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(selected, frozen): detached copies on `device` of the selected parameters and of everything
    else `functional_call` needs (other parameters, buffers). `params` overrides values by name
    (TracIn checkpoints); the user's model is never written to."""
    params = params or {}
    selected, frozen = {}, {}
    for name, p in model.named_parameters():
        value = params.get(name, p).detach().to(device=device, dtype=p.dtype)
        (selected if name in space.names else frozen)[name] = value
    for name, b in model.named_buffers():
        frozen[name] = params.get(name, b).detach().to(device=device, dtype=b.dtype)
    return selected, frozen
