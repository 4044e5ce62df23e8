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
  costs B backward passes per batch but never runs the model under vmap, so it works for any
  model with data-dependent control flow in its forward.
"auto" tries vmap on the first two examples and falls back to batched for good if vmap refuses.

Hugging Face models refuse vmap only because they inspect a 2-D `attention_mask` (`mask.all()`)
to build the attention bias. Handing them the bias ready-made - a 4-D additive mask, which they
pass through untouched - lets them run under vmap. That rewrite is used only after a batched
forward showed it gives the same logits, with one token masked out so the check is not vacuous.
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


def _has_2d_mask(inputs: Inputs) -> bool:
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return isinstance(mask, torch.Tensor) and mask.dim() == 2


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2-D padding mask [B, T] (1 = attend) -> 4-D additive attention bias [B, 1, 1, T] (0 where
    attended, the dtype's most negative value where masked), the form transformers accepts as is."""
    keep = mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


@dataclass
class GradientFunction:
    """Per-example J^T v for one model at fixed parameters `selected` (+ `frozen` state)."""

    model: torch.nn.Module
    space: ParamSpace
    selected: dict[str, torch.Tensor]
    frozen: dict[str, torch.Tensor]
    mode: str = "auto"  # "auto" | "vmap" | "batched"
    chunk: int = 16  # examples per forward on the batched path (it costs chunk^2 backward work)
    _resolved: str | None = field(default=None, repr=False)  # "vmap" | "batched" once chosen
    _mask_bias: bool = field(default=False, repr=False)  # vmap path passes a 4-D attention bias

    def forward(self, params: dict[str, torch.Tensor], inputs: Inputs) -> torch.Tensor:
        """Logits [B, C] at `params` (selected parameters by name; the rest from `frozen`)."""
        return call_logits(self.model, {**self.frozen, **params}, inputs)

    @property
    def path(self) -> str | None:
        """How gradients are vectorised once chosen: "vmap", "vmap (4-D attention bias)" or "batched"."""
        if self._resolved == "vmap" and self._mask_bias:
            return "vmap (4-D attention bias)"
        return self._resolved

    def _with_bias(self, inputs: Inputs) -> Inputs:
        dtype = next((t.dtype for t in self.selected.values() if t.is_floating_point()), torch.float32)
        return {**inputs, "attention_mask": additive_mask(inputs["attention_mask"], dtype)}

    def _bias_gives_same_logits(self, inputs: Inputs) -> bool:
        mask = inputs["attention_mask"].clone()
        if mask.shape[1] > 1:
            mask[0, -1] = 0  # one masked token, so a model that ignores the bias cannot pass
        probe = {**inputs, "attention_mask": mask}
        try:
            with torch.no_grad():
                want = self.forward(self.selected, probe)
                got = self.forward(self.selected, self._with_bias(probe))
        except Exception:  # noqa: BLE001 - whatever the model raises, it does not take the bias
            return False
        return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5 * (1 + want.abs().max()))

    def _choose_path(self, inputs: Inputs, labels: torch.Tensor, cot: Cotangents, noise) -> str:
        if self.mode == "batched":
            return "batched"
        trial = slice(0, min(2, batch_len(inputs)))
        x, y, u = slice_inputs(inputs, trial), labels[trial], None if noise is None else noise[trial]
        refusal = None
        for bias in (False, True) if _has_2d_mask(inputs) else (False,):
            if bias and not self._bias_gives_same_logits(x):
                break
            self._mask_bias = bias
            try:
                self._vmap_path(x, y, cot, u)
                return "vmap"
            except RuntimeError as exc:
                if not _is_vmap_refusal(exc):
                    raise
                refusal = exc
        self._mask_bias = False
        if self.mode == "vmap":
            first = str(refusal).strip().splitlines()[0]
            raise UnsupportedModel(f"This model cannot run under torch.func.vmap ({first}); use grad_mode='auto'.")
        return "batched"

    def _vmap_path(self, inputs, labels, cot: Cotangents, noise) -> dict[str, torch.Tensor]:
        prepare = self._with_bias if self._mask_bias else (lambda x: x)

        def one(params, x, y, u):
            z, pullback = vjp(lambda p: self.forward(p, prepare(_unsqueeze(x)))[0], params)
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
        if self._resolved is None:
            self._resolved = self._choose_path(inputs, labels, cot, noise)
        if self._resolved == "vmap":
            return self.space.flatten(self._vmap_path(inputs, labels, cot, noise), lead=2)
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
