"""The curvature statistics a build sums over training examples, and the running sums that
gather them batch by batch.

Every statistic is a sum over rows of x x^T (a Gram matrix). Batches are buffered and multiplied
in chunks of about CHUNK_ELEMENTS: on a small model a batch's matmuls are tiny and their count,
not their arithmetic, would set the build's time. Products are taken in the rows' dtype over one
chunk and summed across chunks in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 1 << 18  # buffered row elements per product (1 MB of float32)


@dataclass(frozen=True)
class KroneckerSums:
    """One layer's projected K-FAC statistics over some examples: `inputs` sum of a a^T [k_in, k_in]
    over `positions` non-padding positions, `outputs` sum of s s^T over the Gauss-Newton factors'
    output gradients at every position [1, k_out, k_out]."""

    inputs: torch.Tensor
    positions: float
    outputs: torch.Tensor

    def __add__(self, other: KroneckerSums) -> KroneckerSums:
        return KroneckerSums(self.inputs + other.inputs, self.positions + other.positions, self.outputs + other.outputs)


@dataclass(frozen=True)
class ShardSums:
    """The curvature statistics of some training examples, per layer: `blocks` sum of g g^T over
    Gauss-Newton factors [D_l, D_l] and the projected K-FAC `factors`. Shards add up."""

    blocks: list[torch.Tensor]
    factors: list[KroneckerSums]

    def __add__(self, other: ShardSums) -> ShardSums:
        return ShardSums([a + b for a, b in zip(self.blocks, other.blocks, strict=True)],
                         [a + b for a, b in zip(self.factors, other.factors, strict=True)])


class GramSums:
    """Running sum over rows x [*, D] of x_l x_l^T for each column block l (`blocks`, summing to
    D): [D_l, D_l] float64 on the CPU per block."""

    def __init__(self, blocks: Sequence[int]):
        self.blocks = tuple(blocks)
        self.rows = 0
        self._sums = [torch.zeros(d, d, dtype=torch.float64) for d in self.blocks]
        self._pending: list[torch.Tensor] = []
        self._buffered = 0

    def add(self, rows: torch.Tensor) -> None:
        """Adds rows [R, D] (kept by reference until the next product: do not modify them)."""
        self._pending.append(rows)
        self.rows += len(rows)
        self._buffered += rows.numel()
        if self._buffered >= CHUNK_ELEMENTS:
            self._flush()

    def result(self) -> list[torch.Tensor]:
        """[D_l, D_l] per block over every row added so far."""
        self._flush()
        return [s.clone() for s in self._sums]

    def _flush(self) -> None:
        if not self._pending:
            return
        rows = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        start = 0
        for total, d in zip(self._sums, self.blocks, strict=True):
            part = rows[:, start : start + d]
            total += (part.T @ part).to(device="cpu", dtype=torch.float64)
            start += d
        self._pending, self._buffered = [], 0


class FactorSums:
    """Running projected K-FAC statistics of each layer (`dims`: (k_in, k_out) per layer)."""

    def __init__(self, dims: Sequence[tuple[int, int]]):
        self._inputs = [GramSums((k_in,)) for k_in, _ in dims]
        self._outputs = [GramSums((k_out,)) for _, k_out in dims]

    def add_inputs(self, layer: int, inputs: torch.Tensor) -> None:
        """Layer `layer`'s projected inputs at its non-padding positions [P, k_in]."""
        self._inputs[layer].add(inputs)

    def add_outputs(self, layer: int, outputs: torch.Tensor) -> None:
        """Layer `layer`'s projected output gradients of Gauss-Newton factors [R, k_out]."""
        self._outputs[layer].add(outputs)

    def result(self) -> list[KroneckerSums]:
        return [KroneckerSums(a.result()[0], float(a.rows), s.result()[0].unsqueeze(0))
                for a, s in zip(self._inputs, self._outputs, strict=True)]
