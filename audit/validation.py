"""Great Expectations suite for flagged batches: nothing downstream runs on a batch that fails."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from audit.expectations import run_suite
from audit.flagged import REQUIRED_COLUMNS


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


_FLOAT32_MAX = 3.4028234663852886e38
# Flagged pixels may lie outside the training range by this share of its width (at least of 1):
# room for a value rounded through float32 or text on its way to the batch, never a new scale.
RANGE_TOLERANCE = 1e-6
_RANGE_CHECK = "pixels_in_range"


def _is_pixel(value: object) -> bool:
    """A plain real number the model's float32 input can hold (no string, list, bool or overflow)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(float(value)) and abs(float(value)) <= _FLOAT32_MAX


def _derived_columns(frame: pd.DataFrame, input_range: tuple[float, float] | None) -> pd.DataFrame:
    """Columns the suite checks that GX cannot compute on list cells (length, every value a
    finite float32 number, every value in the training range) and on two columns (whether the
    row is a misprediction). A row whose values are not all finite numbers counts as in range:
    the finiteness check already names it."""
    out = frame.copy()
    if "pixels" in out.columns:
        lists = [p if hasattr(p, "__len__") and not isinstance(p, (str, bytes, dict)) else [] for p in out["pixels"]]
        out["pixels_length"] = [len(p) for p in lists]
        out["pixels_finite"] = [bool(len(p)) and all(_is_pixel(v) for v in p) for p in lists]
        if input_range is not None:
            low, high = input_range
            slack = RANGE_TOLERANCE * max(1.0, high - low)
            out[_RANGE_CHECK] = [not finite or all(low - slack <= float(v) <= high + slack for v in p)
                                 for p, finite in zip(lists, out["pixels_finite"], strict=True)]
    if {"predicted_label", "true_label"} <= set(out.columns):
        out["is_misprediction"] = [bool(a != b) for a, b in zip(out["predicted_label"], out["true_label"], strict=True)]
    return out


def validate_flagged_frame(frame: pd.DataFrame, num_classes: int, input_size: int, *, max_rows: int | None = None,
                           input_range: tuple[float, float] | None = None) -> BatchValidation:
    """Run the flagged-batch suite on `frame` for a model with `num_classes` labels whose input
    flattens to `input_size` values. Never raises on bad data: failures are in the result.

    `max_rows`: a batch with more rows fails on that check alone (the per-row checks are not run
    on a batch that will not be audited). `input_range`: the (min, max) of the model's training
    inputs; every pixel must lie within it, give or take RANGE_TOLERANCE x max(1, max - min),
    and the failed check names the range and how many rows fall outside. None (a model logged
    before the range was recorded): pixels are checked for finiteness only."""
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
        checks += [E.ExpectColumnToExist(column=c, description=f"column `{c}` present") for c in REQUIRED_COLUMNS]
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
            E.ExpectColumnValuesToBeBetween(
                column="pixels_length", min_value=input_size, max_value=input_size,
                description=f"every `pixels` list holds {input_size} values",
            ),
            E.ExpectColumnValuesToBeInSet(
                column="pixels_finite", value_set=[True],
                description="every pixel value is a finite number within float32 range",
            ),
        ]
        if input_range is not None:
            checks.append(E.ExpectColumnValuesToBeInSet(
                column=_RANGE_CHECK, value_set=[True],
                description=f"every `pixels` value within the model's training range [{input_range[0]:g}, "
                            f"{input_range[1]:g}]",
            ))
        return checks + [
            E.ExpectColumnValuesToBeInSet(
                column="is_misprediction", value_set=[True],
                description="every row is a misprediction (`predicted_label` differs from `true_label`)",
            ),
        ]

    validated = frame if too_many else _derived_columns(frame, input_range)
    result = run_suite(validated, "flagged_batch", expectations)

    failed = []
    for item in result.results:
        config = item.expectation_config
        column = config.kwargs.get("column")
        # A check on a column that is absent fails too; its "column present" check already says so.
        if item.success or (column and column not in validated.columns and config.type != "expect_column_to_exist"):
            continue
        if column == _RANGE_CHECK:
            outside = item.result.get("unexpected_count")
            failed.append(f"{config.description}: {outside} row{'' if outside == 1 else 's'} outside")
        else:
            failed.append(config.description)
    return BatchValidation(bool(result.success), tuple(dict.fromkeys(failed)), result.to_json_dict())
