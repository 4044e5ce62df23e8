"""Batches in, logits out: collating `(inputs, label)` items (tensors or dicts of tensors, with
right-padding of variable-length sequences), moving them to the device, calling the model
functionally, and the progress bars every pass over data shows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from audit.errors import InvalidInput, UnsupportedModel
from audit.text_classifier import token_counts, trim_padding

Inputs = torch.Tensor | dict[str, torch.Tensor]


def _stack(values: list[torch.Tensor], what: str) -> torch.Tensor:
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) == 1:
        return torch.stack(values)
    if all(v.dim() == 1 for v in values):
        # Variable-length token sequences: right-pad with 0; the attention mask (padded with 0 too)
        # hides the padding, so scores do not depend on how examples were grouped into batches.
        out = values[0].new_zeros(len(values), max(v.shape[0] for v in values))
        for row, v in enumerate(values):
            out[row, : v.shape[0]] = v
        return out
    raise InvalidInput(
        f"All examples must have the same {what} shape (or be 1-D sequences to pad); found {sorted(shapes)}."
    )


def collate(items: list[tuple[Any, Any]]) -> tuple[Inputs, torch.Tensor]:
    """Batch `(inputs, label)` items: tensors are stacked; dicts are stacked key by key, 1-D
    sequences of different lengths right-padded with 0. Labels become int64 [B]."""
    first = items[0][0]
    if isinstance(first, Mapping):
        keys = list(first.keys())
        inputs: Inputs = {k: _stack([torch.as_tensor(x[k]) for x, _ in items], f"inputs[{k!r}]") for k in keys}
    elif isinstance(first, torch.Tensor):
        inputs = _stack([x for x, _ in items], "input")
    else:
        raise InvalidInput(
            f"Dataset items must be (tensor or dict of tensors, label); found {type(first).__name__} inputs."
        )
    labels = torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)
    return inputs, labels


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


def batches(
    data: Dataset, batch_size: int, device: torch.device, desc: str, progress: bool, pad: int | None = None
) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """Batches of `data` in order, on `device`, with a progress bar named `desc`. Token ids of a
    TextClassifier (`pad` its pad token) lose the trailing columns that are padding in every row of
    the batch: the same logits and gradients, without the work on padding."""
    from tqdm.auto import tqdm

    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for inputs, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if pad is not None and isinstance(inputs, torch.Tensor) and inputs.dim() == 2 \
                and not inputs.is_floating_point():
            inputs = trim_padding(inputs, pad)
        yield to_device(inputs, device), labels.to(device)


def slice_inputs(inputs: Inputs, rows: slice) -> Inputs:
    """Rows `rows` of a batch (every tensor of a dict batch)."""
    if isinstance(inputs, Mapping):
        return {k: v[rows] for k, v in inputs.items()}
    return inputs[rows]


def batch_len(inputs: Inputs) -> int:
    if isinstance(inputs, Mapping):
        return next(iter(inputs.values())).shape[0]
    return inputs.shape[0]


def call_logits(model: nn.Module, state: dict[str, torch.Tensor], inputs: Inputs) -> torch.Tensor:
    """Logits [B, C] of `model` run with `state` (parameters and buffers by name): `model(x)` for a
    tensor, `model(**x).logits` (or the tensor it returns) for a dict."""
    if isinstance(inputs, Mapping):
        out = functional_call(model, state, args=(), kwargs=dict(inputs))
    else:
        out = functional_call(model, state, (inputs,))
    if not isinstance(out, torch.Tensor):
        out = getattr(out, "logits", None)
        if not isinstance(out, torch.Tensor):
            raise UnsupportedModel(
                "The model must return logits [batch, classes] or an output with a `.logits` tensor; "
                f"found {type(out).__name__}."
            )
    if out.dim() != 2:
        raise UnsupportedModel(
            f"Influence needs logits of shape [batch, classes]; the model returned {tuple(out.shape)}."
        )
    return out


def dataset_size(data: Dataset, name: str) -> int:
    """len(data), refusing empty or unsized datasets with one clear sentence."""
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError as exc:
        raise InvalidInput(f"`{name}` must be a map-style dataset with a length; got {type(data).__name__}.") from exc
    if n == 0:
        raise InvalidInput(f"`{name}` is empty; influence needs at least one example.")
    return n


def ordered_batches(inputs: Inputs, labels: torch.Tensor, batch_size: int, pad: int | None
                    ) -> Iterator[tuple[torch.Tensor, Inputs, torch.Tensor]]:
    """(positions, inputs, labels) batches covering every row once. Token ids of a TextClassifier
    (`pad` its pad token) go shortest first with their common padding trimmed: the same gradients
    for a fraction of the work on short sentences."""
    n = len(labels)
    text = pad is not None and isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and not inputs.is_floating_point()
    order = torch.argsort(token_counts(inputs, pad), stable=True) if text else torch.arange(n)
    for start in range(0, n, batch_size):
        pos = order[start : start + batch_size]
        if isinstance(inputs, dict):
            x: Inputs = {k: v[pos] for k, v in inputs.items()}
        else:
            x = inputs[pos]
            if text:
                x = trim_padding(x, pad)
        yield pos, x, labels[pos]
