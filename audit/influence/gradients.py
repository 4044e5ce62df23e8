"""Per-example gradients with torch.func: loss gradients and Gauss-Newton "pseudo-gradients".

Everything here is one primitive: for each example i and each output cotangent v_ik [C], the
vector-Jacobian product J_i^T v_ik over the selected parameters, as a flat [B, K, P] tensor.
- loss gradients: v = softmax(z) - onehot(y) (K = 1), the gradient of cross-entropy;
- Gauss-Newton factors: v_c = sqrt(p_c) (p - e_c) for every class c (K = C), so that
  sum_c J^T v_c v_c^T J = J^T (diag(p) - p p^T) J, the example's exact GN / Fisher block; for
  many classes, `samples` labels drawn from the model (v = (p - e_yhat) / sqrt(S)) estimate it.

Two ways to vectorise, no Python loop over examples:
- "vmap": vmap over examples of (forward one example, vjp) - the fast path;
- "batched": one batched forward, then vmap of the vjp over one-hot-per-example cotangents. It
  costs B backward passes per batch but never runs the model under vmap, so it works for models
  with data-dependent control flow in their forward (Hugging Face attention-mask logic).
"auto" tries vmap on the first batch and switches to batched for good if vmap refuses the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch.func import vjp, vmap

from audit.errors import UnsupportedModel
from audit.influence.batches import Inputs, batch_len, call_logits, slice_inputs
from audit.influence.params import ParamSpace

# z [..., C] (detached), y [...], noise [..., S, C] or None  ->  cotangents [..., K, C]
Cotangents = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _onehot(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    # Comparison instead of F.one_hot: one_hot range-checks its input, which vmap cannot do.
    return (torch.arange(num_classes, device=y.device) == y.unsqueeze(-1)).to(dtype)


def loss_cotangents(z: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """d CE / d logits = softmax(z) - onehot(y): [..., 1, C]."""
    return (torch.softmax(z, dim=-1) - _onehot(y, z.shape[-1], z.dtype)).unsqueeze(-2)


def gn_cotangents(z: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Square-root factors of the cross-entropy output Hessian diag(p) - p p^T: [..., K, C].

    noise None: the exact factorisation, K = C. noise [..., S, C] uniform(0, 1): S labels sampled
    from the model by the Gumbel-max trick (true Fisher, unbiased), K = S. `y` is unused (the
    Gauss-Newton matrix does not depend on the labels)."""
    p = torch.softmax(z, dim=-1)
    num_classes = z.shape[-1]
    if noise is None:
        eye = torch.eye(num_classes, dtype=z.dtype, device=z.device)
        return p.sqrt().unsqueeze(-1) * (p.unsqueeze(-2) - eye)  # [..., C, C]
    gumbel = -torch.log(-torch.log(noise.clamp(1e-12, 1 - 1e-12)))
    yhat = torch.argmax(torch.log(p).unsqueeze(-2) + gumbel, dim=-1)  # [..., S]
    return (p.unsqueeze(-2) - _onehot(yhat, num_classes, z.dtype)) / math.sqrt(noise.shape[-2])


def _unsqueeze(inputs: Inputs) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v.unsqueeze(0) for k, v in inputs.items()}
    return inputs.unsqueeze(0)


def _is_vmap_refusal(exc: RuntimeError) -> bool:
    return "vmap" in str(exc).lower() or "data-dependent" in str(exc).lower()


@dataclass
class GradientFunction:
    """Per-example J^T v for one model at fixed parameters `selected` (+ `frozen` state)."""

    model: torch.nn.Module
    space: ParamSpace
    selected: dict[str, torch.Tensor]
    frozen: dict[str, torch.Tensor]
    mode: str = "auto"  # "auto" | "vmap" | "batched"
    chunk: int = 16  # examples per forward on the batched path (it costs chunk^2 backward work)
    _resolved: str | None = field(default=None, repr=False)

    def forward(self, params: dict[str, torch.Tensor], inputs: Inputs) -> torch.Tensor:
        """Logits [B, C] at `params` (selected parameters by name; the rest from `frozen`)."""
        return call_logits(self.model, {**self.frozen, **params}, inputs)

    def _vmap_path(self, inputs, labels, cot: Cotangents, noise) -> dict[str, torch.Tensor]:
        def one(params, x, y, u):
            z, pullback = vjp(lambda p: self.forward(p, _unsqueeze(x))[0], params)
            v = cot(z.detach(), y, u)  # [K, C]
            return vmap(pullback)(v)[0]

        return vmap(one, in_dims=(None, 0, 0, None if noise is None else 0))(self.selected, inputs, labels, noise)

    def _batched_path(self, inputs, labels, cot: Cotangents, noise) -> dict[str, torch.Tensor]:
        z, pullback = vjp(lambda p: self.forward(p, inputs), self.selected)  # z [B, C]
        v = cot(z.detach(), labels, noise)  # [B, K, C]
        b, k, c = v.shape
        idx = torch.arange(b, device=v.device)
        onehot = v.new_zeros(b, k, b, c)
        onehot[idx, :, idx, :] = v  # cotangent (i, k) is v_ik on example i and zero elsewhere
        grads = vmap(pullback)(onehot.reshape(b * k, b, c))[0]
        return {n: g.reshape(b, k, *g.shape[1:]) for n, g in grads.items()}

    def output_grads(
        self, inputs: Inputs, labels: torch.Tensor, cot: Cotangents, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Flat per-example vector-Jacobian products [B, K, P] for cotangents `cot(z, y, noise)`."""
        if self._resolved in (None, "vmap") and self.mode in ("auto", "vmap"):
            try:
                out = self._vmap_path(inputs, labels, cot, noise)
                self._resolved = "vmap"
                return self.space.flatten(out, lead=2)
            except RuntimeError as exc:
                # the batched path gives the same numbers, so switching mid-pass is safe
                if self.mode == "vmap" or not _is_vmap_refusal(exc):
                    raise
                self._resolved = "batched"
        n = batch_len(inputs)
        parts = []
        for start in range(0, n, self.chunk):
            sl = slice(start, start + self.chunk)
            x = slice_inputs(inputs, sl)
            u = None if noise is None else noise[sl]
            try:
                parts.append(self.space.flatten(self._batched_path(x, labels[sl], cot, u), lead=2))
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UnsupportedModel(
                    f"Per-example gradients through this model failed ({first}); select differentiable parameters "
                    "with param_filter or report the layer that fails."
                ) from exc
        return torch.cat(parts)

    def loss_grads(self, inputs: Inputs, labels: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy gradients [B, P] at each example's own label."""
        return self.output_grads(inputs, labels, loss_cotangents)[:, 0]
