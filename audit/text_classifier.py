"""A Hugging Face sequence classifier as the audit sees every model: one tensor in, logits out.

`TextClassifier(model, pad_token_id)` maps token ids [B, L] (int64, right- or left-padded with
`pad_token_id`) to logits [B, C]. The padding mask is computed from the ids and handed to the HF
model as a ready-made 4-D additive attention bias [B, 1, 1, L] (0 where a token is attended, the
dtype's most negative value where it is padding), which transformers uses as is: nothing in the
forward inspects data to decide what to do, so it runs under torch.func.vmap (the influence
engine's fast path), exports to ONNX with a dynamic batch dimension, and gives the logits of the
HF model called with the 2-D mask `input_ids != pad_token_id`.

transformers is not imported here: the wrapper takes any module that accepts `input_ids` and
`attention_mask` keywords and returns an output with `.logits` (or the logits tensor itself).
"""

from __future__ import annotations

import torch
from torch import nn

from audit.errors import InvalidInput


def pad_token_id_of(tokenizer: object) -> int:
    """The tokenizer's pad token id; InvalidInput when it has none (a text classifier's inputs are
    padded to one length, and the padding must be masked out)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise InvalidInput(f"The tokenizer {type(tokenizer).__name__} has no pad token, so padded token ids cannot be "
                           "masked; set one (for instance tokenizer.pad_token = tokenizer.eos_token) before using it.")
    return pad


def attention_bias(input_ids: torch.Tensor, pad_token_id: int, dtype: torch.dtype) -> torch.Tensor:
    """Token ids [B, L] -> additive attention bias [B, 1, 1, L] of `dtype`: 0 for tokens other than
    `pad_token_id`, torch.finfo(dtype).min for padding."""
    padding = (input_ids == pad_token_id)[:, None, None, :].to(dtype)
    return padding * torch.finfo(dtype).min


def padding_token(model: nn.Module) -> int | None:
    """The pad token id a `TextClassifier` masks, None for any other model."""
    return model.pad_token_id if isinstance(model, TextClassifier) else None


def trim_padding(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Token ids [B, L] without the trailing columns that are padding in every row: [B, L'] with
    L' >= 1. A TextClassifier gives the same logits for both (padding is masked), and passes over
    short sentences padded to a long max_length get several times cheaper."""
    used = (input_ids != pad_token_id).any(dim=0).nonzero()
    return input_ids[:, : int(used.max()) + 1 if len(used) else 1]


def token_counts(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Non-padding tokens per row of [B, L]: [B] int64 (for grouping sentences of similar length)."""
    return (input_ids != pad_token_id).sum(dim=1)


class TextClassifier(nn.Module):
    """`model` (a transformers model for sequence classification, `.model`) applied to token ids
    [B, L] with padding `pad_token_id` masked out; returns logits [B, C] in the model's dtype.
    Train/eval mode, parameters and `.to()` are the wrapped model's (it is the only submodule)."""

    def __init__(self, model: nn.Module, pad_token_id: int) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InvalidInput(f"TextClassifier wraps a torch module (a transformers model); got "
                               f"{type(model).__name__}.")
        if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or pad_token_id < 0:
            raise InvalidInput(f"TextClassifier needs the tokenizer's pad token id (an int >= 0); "
                               f"got {pad_token_id!r}.")
        self.model = model
        self.pad_token_id = pad_token_id

    def _dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] for token ids [B, L] (any integer dtype; int64 is what tokenizers give)."""
        if input_ids.is_floating_point() or input_ids.dim() != 2:
            raise InvalidInput(f"TextClassifier takes integer token ids [batch, length]; got a {input_ids.dtype} "
                               f"tensor of shape {tuple(input_ids.shape)}.")
        input_ids = input_ids.long()
        out = self.model(input_ids=input_ids, attention_mask=attention_bias(input_ids, self.pad_token_id,
                                                                            self._dtype()))
        return out if isinstance(out, torch.Tensor) else out.logits

    def extra_repr(self) -> str:
        return f"pad_token_id={self.pad_token_id}"
