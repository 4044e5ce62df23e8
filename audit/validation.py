"""Great Expectations suite for flagged batches: nothing downstream runs on a batch that fails."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from audit.expectations import run_suite
from audit.flagged import required_columns
from audit.modalities import InputCheck, Modality


@dataclass(frozen=True)
class BatchValidation:
    """Outcome of the suite: `failed_checks` are readable names ("true_label in label set")."""

    success: bool
    failed_checks: tuple[str, ...]
    result: dict = field(repr=False)  # Great Expectations' JSON result, logged as flagged_validation.json

    def summary(self) -> str:
        """One sentence naming the failed checks (or saying all passed)."""
        if self.success:
            return "The flagged batch passed every check."
        return "The flagged batch failed these checks: " + "; ".join(self.failed_checks) + "."


def _derived_columns(frame: pd.DataFrame, modality: Modality, input_range: tuple[float, float] | None,
                     root: Path | None) -> tuple[pd.DataFrame, list[InputCheck]]:
    """Columns the suite checks that GX cannot compute: the modality's per-row input checks (on
    list, text or picture cells; only when every input column is present: otherwise the "column
    present" check names it) and, on two columns, whether the row is a misprediction."""
    out = frame.copy()
    checks = []
    if set(modality.input_columns(frame)) <= set(out.columns):
        checks = modality.input_checks(out, input_range=input_range, root=root)
        for check in checks:
            out[check.name] = check.passed
    if {"predicted_label", "true_label"} <= set(out.columns):
        out["is_misprediction"] = [bool(a != b) for a, b in zip(out["predicted_label"], out["true_label"], strict=True)]
    return out, checks


def validate_flagged_frame(frame: pd.DataFrame, num_classes: int, modality: Modality, *, max_rows: int | None = None,
                           input_range: tuple[float, float] | None = None,
                           root: Path | None = None) -> BatchValidation:
    """Run the flagged-batch suite on `frame` for a model with `num_classes` labels whose input is
    `modality` (its columns present, its `input_checks` passing). Never raises on bad data:
    failures are in the result.

    `max_rows`: a batch with more rows fails on that check alone (the per-row checks are not run
    on a batch that will not be audited). `input_range`: the (min, max) of the model's training
    inputs, for modalities that check it (pixels: every value within it, give or take
    audit.modalities.pixels.RANGE_TOLERANCE x max(1, max - min), the failed check naming the range
    and how many rows fall outside; None, a model logged before the range was recorded: pixels are
    checked for finiteness only). `root`: the folder `image_path` cells are relative to."""
    labels = list(range(num_classes))
    too_many = max_rows is not None and len(frame) > max_rows

    def row_bound(E):
        return E.ExpectTableRowCountToBeBetween(
            max_value=max_rows, description=f"at most {max_rows} rows (`max_flagged`; this batch has {len(frame)})")

    def expectations(E) -> list:
        if too_many:
            return [row_bound(E)]
        checks = [E.ExpectTableRowCountToBeBetween(min_value=1, description="at least one row")]
        checks += [row_bound(E)] if max_rows is not None else []
        checks += [E.ExpectColumnToExist(column=c, description=f"column `{c}` present")
                   for c in required_columns(modality, frame)]
        checks += [
            E.ExpectColumnValuesToNotBeNull(column="example_id", description="`example_id` never empty"),
            E.ExpectColumnValuesToBeUnique(column="example_id", description="`example_id` unique"),
            E.ExpectColumnValuesToBeInSet(
                column="true_label", value_set=labels, description=f"`true_label` in the label set 0..{num_classes - 1}"
            ),
            E.ExpectColumnValuesToBeInSet(
                column="predicted_label", value_set=labels,
                description=f"`predicted_label` in the label set 0..{num_classes - 1}",
            ),
        ]
        checks += [E.ExpectColumnValuesToBeInSet(column=c.name, value_set=[True], description=c.description)
                   for c in input_checks]
        return checks + [
            E.ExpectColumnValuesToBeInSet(
                column="is_misprediction", value_set=[True],
                description="every row is a misprediction (`predicted_label` differs from `true_label`)",
            ),
        ]

    validated, input_checks = (frame, []) if too_many else _derived_columns(frame, modality, input_range, root)
    counted = {c.name: c.counted for c in input_checks if c.counted}
    result = run_suite(validated, "flagged_batch", expectations)

    failed = []
    for item in result.results:
        config = item.expectation_config
        column = config.kwargs.get("column")
        # A check on a column that is absent fails too; its "column present" check already says so.
        if item.success or (column and column not in validated.columns and config.type != "expect_column_to_exist"):
            continue
        if column in counted:
            n = item.result.get("unexpected_count")
            failed.append(f"{config.description}: {n} row{'' if n == 1 else 's'} {counted[column]}")
        else:
            failed.append(config.description)
    return BatchValidation(bool(result.success), tuple(dict.fromkeys(failed)), result.to_json_dict())
