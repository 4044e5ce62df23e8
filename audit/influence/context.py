"""What every pass over data shares: the model in eval mode, the selected parameters, the device,
the per-example gradient function, the number of classes, and seeded randomness.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset

from audit.errors import InvalidInput
from audit.influence.batches import Inputs, batches, call_logits, collate, slice_inputs, to_device
from audit.influence.config import InfluenceConfig
from audit.influence.gradients import GradientFunction, gn_cotangents
from audit.influence.params import ParamFilter, ParamSpace, model_state, select_params
from audit.text_classifier import padding_token
from audit.training import eval_mode

# Per-example gradients are [rows, P] (Gauss-Newton factors [rows, K, P]); these bound one such
# tensor, which the passes copy a few times (preconditioned, rotated, float64 parts).
CPU_GRADIENT_ELEMENTS = 2**28  # 1 GiB in float32: MiniLM-sized models (P = 22.7M) take 11 rows
CUDA_GRADIENT_SHARE = 16  # a CUDA device: 1/16 of its memory per gradient tensor (H200: 8.9 GB)


def gradient_elements(device: torch.device, itemsize: int) -> int:
    """How many values one per-example gradient tensor may hold on `device`. From the device's total
    memory, not its free memory, so that batching (and with it the sampled labels) is reproducible."""
    if device.type == "cuda":
        return max(1, torch.cuda.get_device_properties(device).total_memory // (CUDA_GRADIENT_SHARE * itemsize))
    return CPU_GRADIENT_ELEMENTS


@contextlib.contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off) for the duration, then every submodule's own mode restored.

    Also selects PyTorch's "math" attention kernel: the fused CPU/GPU kernels support neither
    forward-mode AD nor double backward, which curvature-vector products need."""
    with eval_mode(model), sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        # torch's forward-AD decompositions still use torch.jit.script on first use
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        yield


@dataclass
class Context:
    """One model at one set of parameters, ready for passes over data."""

    model: nn.Module
    config: InfluenceConfig
    space: ParamSpace
    device: torch.device
    grads: GradientFunction
    num_classes: int
    progress: bool

    @property
    def max_elements(self) -> int:
        """Values one per-example gradient tensor may hold (see gradient_elements)."""
        return gradient_elements(self.device, self.dtype.itemsize)

    @property
    def gradient_rows(self) -> int:
        """Examples per batch of a pass that forms per-example gradients: `batch_size`, fewer when
        `batch_size x P` would exceed `max_elements`. Batching changes no score."""
        return max(1, min(self.config.batch_size, self.max_elements // self.space.dim))

    def batches(self, data: Dataset, desc: str, per_example: bool = True) -> Iterator[tuple[Inputs, torch.Tensor]]:
        """Batches on the device, labels checked against the model's number of classes; of
        `gradient_rows` examples when the pass forms per-example gradients, else `batch_size`."""
        size = self.gradient_rows if per_example else self.config.batch_size
        for inputs, labels in batches(data, size, self.device, desc, self.progress, padding_token(self.model)):
            self.check_labels(labels)
            yield inputs, labels

    def check_labels(self, labels: torch.Tensor) -> None:
        """InvalidInput unless every label lies in [0, num_classes)."""
        if len(labels) and (labels.min().item() < 0 or labels.max().item() >= self.num_classes):
            raise InvalidInput(
                f"Labels must lie in [0, {self.num_classes}) for a model with {self.num_classes} logits; "
                f"found labels from {labels.min().item()} to {labels.max().item()}."
            )

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.grads.selected.values())).dtype

    def gn_factors(self, inputs: Inputs, labels: torch.Tensor, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Gauss-Newton factors [b, K, P] of one batch (see gradients.py), in sub-batches of at most
        `max_elements` values: K x P per example can be large (K = classes)."""
        noise = self.fisher_noise(len(labels), generator)  # drawn per batch: chunking changes nothing
        k = self.num_classes if noise is None else noise.shape[1]
        rows = max(1, self.max_elements // (k * self.space.dim))
        for start in range(0, len(labels), rows):
            sl = slice(start, start + rows)
            yield self.grads.output_grads(
                slice_inputs(inputs, sl), labels[sl], gn_cotangents, None if noise is None else noise[sl]
            )

    def fisher_noise(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """Uniform noise [n, S, C] for sampled Gauss-Newton labels, or None for the exact expectation."""
        samples = self.config.fisher_samples
        if samples is None:
            if self.num_classes <= self.config.max_exact_classes:
                return None
            samples = 1
        u = torch.rand(n, samples, self.num_classes, generator=generator, dtype=torch.float64)
        return u.to(device=self.device, dtype=self.dtype)


def make_context(
    model: nn.Module,
    train: Dataset,
    config: InfluenceConfig,
    device: torch.device | str | None,
    progress: bool,
    param_filter: ParamFilter = None,
    params: dict[str, torch.Tensor] | None = None,
) -> Context:
    """Context for `model` (run at `params` when given, e.g. a TracIn checkpoint) on `device`
    (default: where the model's parameters are). Call inside `evaluation(model)`."""
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    space = select_params(model, param_filter)
    selected, frozen = model_state(model, space, device, params)
    grads = GradientFunction(model, space, selected, frozen, mode=config.grad_mode)
    x, _ = collate([train[0]])
    with torch.no_grad():
        num_classes = call_logits(model, {**frozen, **selected}, to_device(x, device)).shape[1]
    return Context(model, config, space, device, grads, num_classes, progress)
