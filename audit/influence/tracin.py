"""`tracin`: TracIn-CP (Pruthi et al. 2020) over the checkpoints a training run logged:
score[q, i] = sum_k lr_k * g_q(theta_k) . g_i(theta_k), self-influence sum_k lr_k |g_i(theta_k)|^2.
No curvature and no damping: each checkpoint contributes the gradient-descent step it took.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from audit.errors import InvalidInput

Checkpoint = Mapping[str, torch.Tensor] | str | os.PathLike
Checkpoints = Sequence[Checkpoint | tuple[Checkpoint, float]]


def load_checkpoints(
    checkpoints: Checkpoints | None, method: str = "tracin"
) -> list[tuple[dict[str, torch.Tensor], float]]:
    """[(state_dict, learning_rate)] from state dicts or `torch.save`d state-dict files, each
    optionally paired with the learning rate used after it (default 1.0). `method` names the
    checkpoint-summed method in the refusal when there are none."""
    if not checkpoints:
        raise InvalidInput(
            f"method={method!r} needs checkpoints=[(state_dict or path, learning_rate), ...] from the training "
            "run; none were given (use method='ekfac' for a model without logged checkpoints)."
        )
    loaded = []
    for item in checkpoints:
        ckpt, lr = item if isinstance(item, tuple) else (item, 1.0)
        if isinstance(ckpt, (str, os.PathLike)):
            path = Path(ckpt)
            if not path.exists():
                raise InvalidInput(f"TracIn checkpoint file {path} does not exist; pass existing state-dict files.")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, Mapping) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise InvalidInput(f"A TracIn checkpoint must be a state dict of tensors; found {type(ckpt).__name__}.")
        if not lr > 0:
            raise InvalidInput(f"TracIn learning rates must be > 0; found {lr}.")
        loaded.append((dict(ckpt), float(lr)))
    return loaded


def check_checkpoint(state: dict[str, torch.Tensor], names: Sequence[str], shapes: Sequence[torch.Size]) -> None:
    """Every selected parameter must be in the checkpoint with the model's shape."""
    for name, shape in zip(names, shapes, strict=True):
        if name not in state:
            raise InvalidInput(
                f"TracIn checkpoint lacks parameter {name!r}; checkpoints must be state dicts of this model."
            )
        if tuple(state[name].shape) != tuple(shape):
            raise InvalidInput(
                f"TracIn checkpoint has {name!r} of shape {tuple(state[name].shape)}, the model {tuple(shape)}; "
                "checkpoints must come from this architecture."
            )
