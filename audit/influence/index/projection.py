"""Projected per-example gradients of Linear/Conv2d layers, never forming the full gradient.

For a layer with inputs a_t [width] (bias column appended) and output gradients s_t [out] at
positions t (tokens, conv patches), example i's weight gradient is G_i = sum_t s_t a_t^T. With
random matrices P_out [out, k_out] and P_in [width, k_in] (entries N(0, 1/k), so that
E[(P_out (x) P_in)(P_out (x) P_in)^T] = I and dot products are preserved in expectation), the
projected gradient is

    P_out^T G_i P_in = sum_t (P_out^T s_t)(P_in^T a_t)^T          [k_out, k_in]

which costs two thin matmuls per position instead of the out x width outer product (LoGra, Choe
et al. 2024). A side no larger than its rank keeps the identity: it is exact.

One forward pass serves several cotangents on the logits at once (the loss gradient and the
Gauss-Newton factors of gradients.py), through one batched backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from audit.errors import InvalidInput
from audit.influence.batches import Inputs, batch_len, call_logits, slice_inputs, to_device
from audit.influence.context import Context
from audit.influence.curvature.kfac import Layer, find_layers, layer_inputs, layer_output_grads
from audit.influence.index.config import IndexConfig


@dataclass(frozen=True)
class LayerProjection:
    """One layer's projection: `p_out` [out, k_out] and `p_in` [width, k_in], None = identity."""

    layer: Layer
    p_out: torch.Tensor | None
    p_in: torch.Tensor | None

    @property
    def dim_out(self) -> int:
        return self.layer.out_features if self.p_out is None else self.p_out.shape[1]

    @property
    def dim_in(self) -> int:
        return self.layer.width if self.p_in is None else self.p_in.shape[1]

    @property
    def dim(self) -> int:
        """Columns this layer contributes to an index row."""
        return self.dim_out * self.dim_in


def _gaussian(rows: int, rank: int, generator: torch.Generator) -> torch.Tensor | None:
    if rows <= rank:
        return None
    return torch.randn(rows, rank, generator=generator, dtype=torch.float64) / rank**0.5


def make_projections(layers: Sequence[Layer], config: IndexConfig) -> tuple[LayerProjection, ...]:
    """Seeded projections for `layers`, drawn on the CPU in float64 so that every machine draws the
    same matrices (stored with the index anyway)."""
    generator = torch.Generator().manual_seed(config.seed)
    out = []
    for layer in layers:
        p_out = _gaussian(layer.out_features, config.rank_out, generator)
        p_in = _gaussian(layer.width, config.rank_in, generator)
        out.append(LayerProjection(layer, p_out, p_in))
    return tuple(out)


def indexed_layers(model: nn.Module, ctx: Context) -> list[tuple[Layer, nn.Module]]:
    """The Linear/Conv2d layers among the selected parameters; InvalidInput when there is none."""
    found = find_layers(model, ctx.space)
    if not found:
        raise InvalidInput(
            "The gradient index covers Linear and Conv2d layers, and none of the selected parameters belongs to "
            f"one (selected: {list(ctx.space.names)[:5]}); select such layers or use an exact method."
        )
    return found


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The input a forward hook (with_kwargs=True) saw a Linear/Conv2d called with."""
    return args[0] if args else next(iter(kwargs.values()))


AUTO_BATCH_ELEMENTS = 1 << 22  # indexed-layer input and output elements per batch (16 MB of float32)
AUTO_BATCH_RANGE = (32, 512)


@dataclass(frozen=True)
class Projected:
    """One batch through a Projector: `gradients` [K, B, D] (J_i^T v_ki, layer blocks in index
    order) and, with layer_rows, per call of a projected layer: (its index, its projected inputs
    [B, T, k_in], its projected output gradients [K, B, T, k_out])."""

    gradients: torch.Tensor
    layers: list[tuple[int, torch.Tensor, torch.Tensor]]


class Projector:
    """Projected per-example gradients of one model at fixed parameters (a `Context`)."""

    def __init__(self, ctx: Context, found: list[tuple[Layer, nn.Module]], projections: Sequence[LayerProjection]):
        if [layer for layer, _ in found] != [p.layer for p in projections]:
            raise InvalidInput("This index was built for other layers than the model has; rebuild it for this model.")
        self.ctx = ctx
        self.modules = [m for _, m in found]
        dtype, device = ctx.dtype, ctx.device
        self.projections = list(projections)
        self._p_out = [None if p.p_out is None else p.p_out.to(device, dtype) for p in projections]
        self._p_in = [None if p.p_in is None else p.p_in.to(device, dtype) for p in projections]

    @property
    def dim(self) -> int:
        return sum(p.dim for p in self.projections)

    @property
    def factor_dims(self) -> list[tuple[int, int]]:
        """(k_in, k_out) per layer: the sizes of its projected K-FAC factors."""
        return [(p.dim_in, p.dim_out) for p in self.projections]

    @property
    def blocks(self) -> tuple[int, ...]:
        """Columns per layer, in index order."""
        return tuple(p.dim for p in self.projections)

    def auto_batch_size(self, inputs: Inputs) -> int:
        """Examples per batch when IndexConfig.batch_size is None: the largest power of two in
        AUTO_BATCH_RANGE whose indexed-layer inputs and outputs (what a pass holds per layer) stay
        within AUTO_BATCH_ELEMENTS, measured by one forward pass over up to 8 rows of `inputs`
        (token ids at their stored, padded length: the longest a batch can be). On this CPU a small
        CNN's passes are overhead-bound (256 digits per batch built its index 1.3x faster than 64)
        and a transformer's memory-bound (MiniLM: 32 sentences 1.2x faster than 64, 2.8x than 256)."""
        probe = slice_inputs(inputs, slice(0, 8))
        elements = [0]

        def count(module, args, kwargs, output):
            elements[0] += _layer_input(args, kwargs).numel() + output.numel()

        handles = [m.register_forward_hook(count, with_kwargs=True) for m in self.modules]
        try:
            with torch.no_grad():
                call_logits(self.ctx.model, {**self.ctx.grads.frozen, **self.ctx.grads.selected},
                            to_device(probe, self.ctx.device))
        finally:
            for h in handles:
                h.remove()
        per_example = max(1.0, elements[0] / batch_len(probe))
        low, high = AUTO_BATCH_RANGE
        size = high
        while size > low and size * per_example > AUTO_BATCH_ELEMENTS:
            size //= 2
        return size

    def __call__(self, inputs: Inputs, cotangents, layer_rows: bool = False) -> Projected:
        """Projected gradients J_i^T v_ki [K, B, D] for the cotangents `cotangents(z)` [K, B, C]
        returns from the detached logits z [B, C] of `inputs` (see Projected); with `layer_rows`,
        also what each layer's K-FAC statistics are made of."""
        ctx = self.ctx
        calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.modules]

        def hook(i):
            def record(module, args, kwargs, output):
                calls[i].append((_layer_input(args, kwargs).detach(), output))

            return record

        handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(self.modules)]
        params = {k: v.detach().requires_grad_(True) for k, v in ctx.grads.selected.items()}
        try:
            with torch.enable_grad():
                z = call_logits(ctx.model, {**ctx.grads.frozen, **params}, inputs)
        finally:
            for h in handles:
                h.remove()
        cot = cotangents(z.detach())  # [K, B, C]
        outputs = [out for per_layer in calls for _, out in per_layer]
        if not all(out.requires_grad for out in outputs):
            raise InvalidInput("A projected layer's output does not depend on its selected weight; check param_filter.")
        grads = self._backward(z, outputs, cot)
        parts, rows, n = [], [], 0
        k, b = cot.shape[:2]
        for i, per_layer in enumerate(calls):
            layer, module = self.projections[i].layer, self.modules[i]
            block = None
            for a, _ in per_layer:
                ds = grads[n]  # [K, B, ...]
                n += 1
                act = self._projected_inputs(i, module, layer, a)  # [B, T, k_in]
                s = layer_output_grads(module, ds.reshape(k * b, *ds.shape[2:]), ctx.dtype)  # [KB, T, out]
                if self._p_out[i] is not None:
                    s = s @ self._p_out[i]
                s = s.reshape(k, b, *s.shape[1:])
                g = torch.einsum("kbto,bti->kboi", s, act).reshape(k, b, -1)  # sum_t s_t a_t^T: [K, B, o * i]
                block = g if block is None else block + g
                if layer_rows:
                    rows.append((i, act, s))
            if block is None:
                raise InvalidInput(f"Layer {layer.module!r} was not called by the model's forward pass.")
            parts.append(block)
        return Projected(torch.cat(parts, dim=2), rows)

    def _projected_inputs(self, i: int, module: nn.Module, layer: Layer, a: torch.Tensor) -> torch.Tensor:
        """P_in^T a_t at every position: [B, T, k_in]. A Conv2d projects its patches with one
        convolution whose k_in filters are P_in's columns, instead of unfolding every patch."""
        p_in = self._p_in[i]
        if p_in is not None and isinstance(module, nn.Conv2d):
            weight = p_in[: layer.in_features].T.reshape(-1, *module.weight.shape[1:])
            bias = p_in[-1] if layer.bias is not None else None
            padding = module.padding if module.padding != "valid" else 0
            out = F.conv2d(a.to(p_in.dtype), weight, bias, module.stride, padding, module.dilation)
            return out.reshape(out.shape[0], out.shape[1], -1).transpose(1, 2)
        act = layer_inputs(module, layer, a, self.ctx.dtype)  # [B, T, width]
        return act if p_in is None else act @ p_in

    @staticmethod
    def _backward(z: torch.Tensor, outputs: list[torch.Tensor], cot: torch.Tensor) -> list[torch.Tensor]:
        """d(cot_k . z)/d output for every k at once ([K, ...] each); one pass per k when the model
        has an operation without a batching rule."""
        try:
            # retain_graph: a refusal part-way must leave the graph for the fallback
            return list(torch.autograd.grad(z, outputs, cot, retain_graph=True, is_grads_batched=True))
        except RuntimeError:
            per_k = []
            for k in range(cot.shape[0]):
                per_k.append(torch.autograd.grad(z, outputs, cot[k], retain_graph=k + 1 < cot.shape[0]))
            return [torch.stack([g[j] for g in per_k]) for j in range(len(outputs))]
