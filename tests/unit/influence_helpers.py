"""A tiny float64 MLP and seeded data shared by the influence tests (exact references stay cheap)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset


def tiny_mlp(seed: int = 0) -> nn.Module:
    """4 -> 5 -> 3 tanh MLP in float64, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def tiny_data(n: int, seed: int) -> TensorDataset:
    """`n` float64 inputs [n, 4] with labels in 0..2, seeded."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
