"""The flagged-batch Great Expectations suite on a real ephemeral GX context."""

import pandas as pd

from audit.validation import validate_flagged_frame


def _frame():
    return pd.DataFrame({
        "example_id": ["a", "b", "c"],
        "pixels": [[0.0] * 64, [1.0] * 64, [16.0] * 64],
        "predicted_label": [1, 2, 3],
        "true_label": [7, 8, 9],
    })


def test_a_good_batch_passes_and_the_result_is_json():
    import json

    result = validate_flagged_frame(_frame(), num_classes=10, input_size=64)
    assert result.success, result.summary()
    assert json.loads(json.dumps(result.result))["success"] is True


def test_failed_checks_are_named_and_each_bad_column_reported():
    frame = _frame()
    frame.loc[2, "example_id"] = "a"
    frame.loc[1, "true_label"] = 12
    frame.at[0, "pixels"] = [float("nan")] * 64
    frame.at[2, "pixels"] = [0.0] * 10
    result = validate_flagged_frame(frame, num_classes=10, input_size=64)
    assert not result.success
    assert set(result.failed_checks) == {
        "`example_id` unique",
        "`true_label` in the label set 0..9",
        "every `pixels` list holds 64 values",
        "every pixel value is a finite number",
    }
    assert result.summary().startswith("The flagged batch failed these checks:")


def test_missing_column_is_named_once():
    result = validate_flagged_frame(_frame().drop(columns=["pixels"]), num_classes=10, input_size=64)
    assert result.failed_checks == ("column `pixels` present",)
