"""A tiny float64 MLP and seeded data shared by the influence tests (exact references stay cheap)."""

import contextlib
import dataclasses
from collections.abc import Iterator

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


@contextlib.contextmanager
def counted_fits(method: str) -> Iterator[list[int]]:
    """Registers `counted_<method>`: `method` with its registered fit wrapped to record the training
    size of every call (nothing mocked); yields that list, and unregisters on exit."""
    from audit.influence import register_method, registry

    registered = registry.lookup(method)
    fits: list[int] = []

    def fit(ctx, train, n):
        fits.append(n)
        return registered.fit(ctx, train, n)

    with register_method(dataclasses.replace(registered, name=f"counted_{method}", fit=fit, restore=None)):
        yield fits
