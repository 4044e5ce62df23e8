"""Training and prediction loops shared by the demo, the correction strategies and the tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class TrainConfig:
    """Mini-batch training with Adam; `weight_decay` is decoupled (AdamW)."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


def train(model: nn.Module, data: Dataset, config: TrainConfig = TrainConfig()) -> list[float]:
    """Train `model` in place on `(inputs, label)` items with cross-entropy; returns the mean
    training loss of each epoch. Seeded: the same config and data give the same model."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(loader))
    losses = []
    model.train()
    for _ in range(config.epochs):
        total, count = 0.0, 0
        for inputs, labels in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(labels)
            count += len(labels)
        losses.append(total / count)
    model.eval()
    return losses


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode for the duration, then every submodule's own mode restored (not the
    top module's mode pushed down: a wrapper left in train mode around an eval-mode transformers
    model must not switch that model's dropout on)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits [N, classes] in eval mode; every submodule's train/eval mode is restored after."""
    with eval_mode(model):
        return torch.cat([model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)])


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `inputs` whose argmax logit equals `labels`, in [0, 1]."""
    return (predict_logits(model, inputs).argmax(dim=1) == labels).float().mean().item()
