"""The evidence behind a correction's gates: which validation examples changed prediction between
the champion and the repair, and which label edits touched their classes. Plain values, so a
reviewer can tie a failed class-recall gate to the digit that broke and the edits behind it."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from audit.examples import ExampleTable
from audit.training import predict_logits

CHANGES = ("lost", "gained", "changed")


def prediction_changes(before: nn.Module, after: nn.Module, examples: ExampleTable) -> pd.DataFrame:
    """One row per example of `examples` whose predicted class differs between `before` (the
    champion) and `after` (the repair): example_id, label, before, after (predicted classes) and
    change: `lost` (was right, now wrong), `gained` (was wrong, now right) or `changed` (wrong
    both times). Rows in the table's order; empty (same columns) when nothing changed."""
    with torch.no_grad():
        old = predict_logits(before, examples.inputs).argmax(1)
        new = predict_logits(after, examples.inputs).argmax(1)
    labels = examples.labels
    rows = [{"example_id": examples.ids[i], "label": int(labels[i]), "before": int(old[i]), "after": int(new[i]),
             "change": "lost" if old[i] == labels[i] else "gained" if new[i] == labels[i] else "changed"}
            for i in (old != new).nonzero().flatten().tolist()]
    return pd.DataFrame(rows, columns=["example_id", "label", "before", "after", "change"])


def edits_touching(relabels: dict[str, int], current: dict[str, int], label: int) -> list[str]:
    """The label edits that moved a training example into or out of class `label`, as
    "id: current -> proposed" (`current`: train id -> its label before the edit)."""
    return [f"{i}: {current[i]} \u2192 {y}" for i, y in relabels.items() if label in (current[i], y)]
