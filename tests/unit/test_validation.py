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
        "every pixel value is a finite number within float32 range",
    }
    assert result.summary().startswith("The flagged batch failed these checks:")


def test_missing_column_is_named_once():
    result = validate_flagged_frame(_frame().drop(columns=["pixels"]), num_classes=10, input_size=64)
    assert result.failed_checks == ("column `pixels` present",)


def test_malformed_pixels_and_correct_predictions_are_named_never_raised():
    frame = _frame()
    frame["pixels"] = frame["pixels"].astype(object)
    frame.at[0, "pixels"] = ["1.0"] * 64  # strings
    frame.at[1, "pixels"] = [[0.0] * 8] * 8  # nested 8x8 lists
    frame.at[2, "pixels"] = [1e39] * 64  # beyond float32
    result = validate_flagged_frame(frame, num_classes=10, input_size=64)
    assert result.failed_checks == ("every `pixels` list holds 64 values",
                                    "every pixel value is a finite number within float32 range")
    right = _frame()
    right.loc[0, "predicted_label"] = right.loc[0, "true_label"]
    assert validate_flagged_frame(right, num_classes=10, input_size=64).failed_checks == (
        "every row is a misprediction (`predicted_label` differs from `true_label`)",)


def test_an_unparsable_csv_cell_is_one_sentence(tmp_path):
    import pytest

    from audit.errors import InvalidFlaggedBatch
    from audit.flagged import read_batch_file

    bad = tmp_path / "flagged.csv"
    bad.write_text('example_id,pixels,predicted_label,true_label\na,"[1.0, 2.0",1,3\n')
    with pytest.raises(InvalidFlaggedBatch, match="Cannot read flagged batch flagged.csv"):
        read_batch_file(bad)


def test_pixels_outside_the_training_range_are_named_with_the_range_and_the_row_count():
    from audit.validation import RANGE_TOLERANCE

    frame = _frame()
    frame["pixels"] = frame["pixels"].astype(object)
    frame.at[0, "pixels"] = [0.0] * 63 + [16.5]  # one value above
    frame.at[1, "pixels"] = [-1.0] * 64  # all below
    result = validate_flagged_frame(frame, num_classes=10, input_size=64, input_range=(0.0, 16.0))
    assert result.failed_checks == ("every `pixels` value within the model's training range [0, 16]: 2 rows outside",)
    # within the stated tolerance, RANGE_TOLERANCE x the range's width, a value still passes
    edge = _frame()
    edge.at[0, "pixels"] = [16.0 + 0.9 * RANGE_TOLERANCE * 16.0] * 64
    edge.at[1, "pixels"] = [-0.9 * RANGE_TOLERANCE * 16.0] * 64
    assert validate_flagged_frame(edge, num_classes=10, input_size=64, input_range=(0.0, 16.0)).success
    edge.at[2, "pixels"] = [16.0 + 2 * RANGE_TOLERANCE * 16.0] * 64
    assert validate_flagged_frame(edge, num_classes=10, input_size=64, input_range=(0.0, 16.0)).failed_checks == (
        "every `pixels` value within the model's training range [0, 16]: 1 row outside",)


def test_without_a_recorded_range_pixels_are_checked_for_finiteness_only():
    frame = _frame()
    frame.at[0, "pixels"] = [99.0] * 64
    assert validate_flagged_frame(frame, num_classes=10, input_size=64).success
    # a non-finite row is named once, by the finiteness check, not again as out of range
    frame.at[1, "pixels"] = [float("inf")] * 64
    result = validate_flagged_frame(frame, num_classes=10, input_size=64, input_range=(0.0, 16.0))
    assert result.failed_checks == ("every pixel value is a finite number within float32 range",
                                    "every `pixels` value within the model's training range [0, 16]: 1 row outside")


def test_a_batch_over_the_row_bound_fails_on_that_alone():
    frame = _frame()
    frame.loc[0, "true_label"] = 42  # not reported: a batch this size is refused before its rows are read
    result = validate_flagged_frame(frame, num_classes=10, input_size=64, max_rows=2, input_range=(0.0, 16.0))
    assert not result.success
    assert result.failed_checks == ("at most 2 rows (`max_flagged`; this batch has 3)",)
    assert result.summary() == ("The flagged batch failed these checks: "
                                "at most 2 rows (`max_flagged`; this batch has 3).")
    assert validate_flagged_frame(_frame(), num_classes=10, input_size=64, max_rows=3).success
