"""The few fine-tuning steps every correction strategy takes (full-batch, in place)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from audit.errors import InvalidInput, NumericalError


def finetune_steps(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float,
    *,
    optimizer: str = "sgd",
    replay_inputs: torch.Tensor | None = None,
    replay_labels: torch.Tensor | None = None,
    ascent_inputs: torch.Tensor | None = None,
    ascent_labels: torch.Tensor | None = None,
    ascent_bound: float = 2.3,
    callback: Callable[[int], None] | None = None,
) -> list[float]:
    """Take `steps` full-batch steps on `model` IN PLACE; returns the objective before each step.

    Objective: mean cross-entropy over (`inputs` [B, ...], `labels` [B]), plus the mean
    cross-entropy over (`replay_inputs` [R, ...], `replay_labels` [R] class indices or [R, C]
    probabilities, e.g. the input model's own, which anchors the whole output distribution) when
    given (a separate mean, so a handful of selected examples is not drowned by a large replay
    sample), minus, when
    `ascent_inputs` [A, ...] are given, the mean of each ascent example's cross-entropy clipped at
    `ascent_bound` (bounded gradient ascent: an example stops pushing once its loss exceeds the
    bound). `optimizer` "sgd" (plain gradient descent, the influence-horizon protocol) or "adam"
    (fresh state). `callback(step)` runs after each step (1-based), e.g. to measure a query loss.
    The steps run in eval mode, and the model is left in it: batch-norm statistics stay frozen and
    dropout off, so the steps change only the weights, the change the influence estimate predicts
    (in train mode, 20 steps on 5 examples re-estimated a torchvision resnet18's batch-norm
    statistics from those 5 and cost it 30 points of validation accuracy; measured).
    """
    if len(inputs) != len(labels):
        raise InvalidInput(f"finetune_steps needs one label per input; found {len(inputs)} inputs "
                           f"and {len(labels)} labels.")
    has_ascent = ascent_inputs is not None and len(ascent_inputs) > 0
    has_replay = replay_inputs is not None and len(replay_inputs) > 0
    if len(inputs) == 0 and not has_ascent and not has_replay:
        raise InvalidInput("finetune_steps got no examples to train on; select at least one training example.")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    history = []
    model.eval()
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = torch.zeros(())
        if len(inputs):
            loss = nn.functional.cross_entropy(model(inputs), labels)
        if has_replay:
            loss = loss + nn.functional.cross_entropy(model(replay_inputs), replay_labels)
        if has_ascent:
            per_example = nn.functional.cross_entropy(model(ascent_inputs), ascent_labels, reduction="none")
            # clamp kills the gradient of examples already pushed past the bound
            loss = loss - per_example.clamp(max=ascent_bound).mean()
        if not torch.isfinite(loss):
            raise NumericalError(f"Fine-tuning loss became {loss.item()} at step {step}; "
                                 f"lower the learning rate (now {lr}).")
        history.append(loss.item())
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step)
    return history
