"""Influence engine (first version: gradient similarity; the full engine replaces it).

Sign convention (DESIGN.md): `S[q, i] > 0` means up-weighting training example i is predicted to
lower the loss of query q at q's label.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset

__all__ = ["influence_scores", "self_influence"]


def _per_example_grads(model: nn.Module, data: Dataset, batch_size: int) -> torch.Tensor:
    """Flattened cross-entropy gradients [N, P] over all trainable parameters, eval mode."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss(p, x, y):
        logits = functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    was_training = model.training
    model.eval()
    chunks = []
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        g = per_example(params, x, y)
        chunks.append(torch.cat([g[k].reshape(len(y), -1) for k in params], dim=1))
    model.train(was_training)
    return torch.cat(chunks)


def influence_scores(
    model: nn.Module, train: Dataset, queries: Dataset, method: str = "graddot", damping: float | None = None,
    batch_size: int = 64, **_: object,
) -> torch.Tensor:
    """Scores [len(queries), len(train)]: g_q . g_i / damping (damping=None -> 1)."""
    if method != "graddot":
        raise NotImplementedError(f"method {method!r} lands with the influence engine")
    g_train = _per_example_grads(model, train, batch_size)
    g_query = _per_example_grads(model, queries, batch_size)
    return g_query @ g_train.T / (damping or 1.0)


def self_influence(model: nn.Module, train: Dataset, method: str = "graddot", damping: float | None = None,
                   batch_size: int = 64, **_: object) -> torch.Tensor:
    """Self-influence [len(train)]: |g_i|^2 / damping."""
    if method != "graddot":
        raise NotImplementedError(f"method {method!r} lands with the influence engine")
    return _per_example_grads(model, train, batch_size).pow(2).sum(1) / (damping or 1.0)
