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


def _is_pixel(value: object) -> bool:
    """A plain real number the model's float32 input can hold (no string, list, bool or overflow)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(float(value)) and abs(float(value)) <= _FLOAT32_MAX


def _derived_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns the suite checks that GX cannot compute on list cells (length, every value a
    finite float32 number) and on two columns (whether the row is a misprediction)."""
    out = frame.copy()
    if "pixels" in out.columns:
        lists = [p if hasattr(p, "__len__") and not isinstance(p, (str, bytes, dict)) else [] for p in out["pixels"]]
        out["pixels_length"] = [len(p) for p in lists]
        out["pixels_finite"] = [bool(len(p)) and all(_is_pixel(v) for v in p) for p in lists]
    if {"predicted_label", "true_label"} <= set(out.columns):
        out["is_misprediction"] = [bool(a != b) for a, b in zip(out["predicted_label"], out["true_label"], strict=True)]
    return out


def validate_flagged_frame(frame: pd.DataFrame, num_classes: int, input_size: int) -> BatchValidation:
    """Run the flagged-batch suite on `frame` for a model with `num_classes` labels whose input
    flattens to `input_size` values. Never raises on bad data: failures are in the result."""
    labels = list(range(num_classes))

    def expectations(E) -> list:
        checks = [E.ExpectTableRowCountToBeBetween(min_value=1, description="at least one row")]
        checks += [E.ExpectColumnToExist(column=c, description=f"column `{c}` present") for c in REQUIRED_COLUMNS]
        return checks + [
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
            E.ExpectColumnValuesToBeInSet(
                column="is_misprediction", value_set=[True],
                description="every row is a misprediction (`predicted_label` differs from `true_label`)",
            ),
        ]

    validated = _derived_columns(frame)
    result = run_suite(validated, "flagged_batch", expectations)

    failed = []
    for item in result.results:
        config = item.expectation_config
        column = config.kwargs.get("column")
        # A check on a column that is absent fails too; its "column present" check already says so.
        if item.success or (column and column not in validated.columns and config.type != "expect_column_to_exist"):
            continue
        failed.append(config.description)
    return BatchValidation(bool(result.success), tuple(dict.fromkeys(failed)), result.to_json_dict())
