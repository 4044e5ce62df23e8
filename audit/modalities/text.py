"""The `text` modality: each example's input is a string in column `text`, tokenized with the
model's own tokenizer (a `transformers` model kind holds it once loaded) into `max_length` token
ids, padded with the tokenizer's pad id and truncated. Recorded as run param `text_max_length`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd
import torch

from audit.errors import InvalidInput, LineageError
from audit.examples import ExampleTable
from audit.modalities.registry import InputCheck, Modality, ids_of, labels_of, register


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


@dataclass(frozen=True)
class Text(Modality):
    """Strings in column `text`, encoded as int64 token ids [max_length]; `display` holds the strings."""

    name: ClassVar[str] = "text"
    columns: ClassVar[tuple[str, ...]] = ("text",)
    # Longer cells are refused by the flagged batch's suite: no sentence a reviewer flags is this long,
    # and tokenizing megabytes of text to keep max_length tokens is wasted work.
    max_chars: ClassVar[int] = 20_000

    max_length: int

    def __post_init__(self) -> None:
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise InvalidInput(f"A text modality's max_length must be a positive integer, got {self.max_length!r}.")

    def params(self) -> dict[str, str]:
        return {"text_max_length": str(self.max_length)}

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Text:
        try:
            return cls(int(params["text_max_length"]))
        except (KeyError, ValueError, InvalidInput) as exc:
            raise LineageError("The model's run records modality `text` without a usable `text_max_length` "
                               "param (a positive integer).") from exc

    def input_shape(self) -> tuple[int, ...]:
        return (self.max_length,)

    def table(self, frame: pd.DataFrame, *, label_column: str = "label", tokenizer=None,
              root: Path | None = None) -> ExampleTable:
        """Token ids int64 [N, max_length] from `tokenizer` (a transformers tokenizer), `display` the
        texts. InvalidInput without a tokenizer, or when a `text` cell is not a non-empty string."""
        if tokenizer is None:
            raise InvalidInput("Encoding text needs the tokenizer of a `transformers` model kind, which only a "
                               "loaded model holds: encode the data with the spec of the loaded model.")
        texts = list(frame["text"])
        if not all(_is_text(t) for t in texts):
            raise InvalidInput("Every `text` cell must be a non-empty string.")
        ids = (tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                         return_tensors="pt")["input_ids"] if texts else torch.zeros(0, self.max_length))
        return ExampleTable(ids_of(frame), ids.to(torch.int64), labels_of(frame, label_column), tuple(texts))

    def input_checks(self, frame: pd.DataFrame, *, input_range: tuple[float, float] | None = None,
                     root: Path | None = None) -> list[InputCheck]:
        """Every `text` a non-empty string of at most `max_chars` characters."""
        texts = list(frame["text"])
        return [
            InputCheck("text_nonempty", [_is_text(t) for t in texts], "every `text` is a non-empty string"),
            InputCheck("text_length", [not isinstance(t, str) or len(t) <= self.max_chars for t in texts],
                       f"every `text` holds at most {self.max_chars} characters", counted="longer"),
        ]


register(Text)
