"""The flagged-batch Great Expectations suite on a real ephemeral GX context."""

import pandas as pd

from audit.modalities import Pixels
from audit.validation import validate_flagged_frame

PIXELS = Pixels((1, 8, 8))


def _frame():
    return pd.DataFrame({
        "example_id": ["a", "b", "c"],
        "pixels": [[0.0] * 64, [1.0] * 64, [16.0] * 64],
        "predicted_label": [1, 2, 3],
        "true_label": [7, 8, 9],
    })


def test_a_good_batch_passes_and_the_result_is_json():
    import json

    result = validate_flagged_frame(_frame(), num_classes=10, modality=PIXELS)
    assert result.success, result.summary()
    assert json.loads(json.dumps(result.result))["success"] is True


def test_failed_checks_are_named_and_each_bad_column_reported():
    frame = _frame()
    frame.loc[2, "example_id"] = "a"
    frame.loc[1, "true_label"] = 12
    frame.at[0, "pixels"] = [float("nan")] * 64
    frame.at[2, "pixels"] = [0.0] * 10
    result = validate_flagged_frame(frame, num_classes=10, modality=PIXELS)
    assert not result.success
    assert set(result.failed_checks) == {
        "`example_id` unique",
        "`true_label` in the label set 0..9",
        "every `pixels` list holds 64 values",
        "every pixel value is a finite number within float32 range",
    }
    assert result.summary().startswith("The flagged batch failed these checks:")


def test_missing_column_is_named_once():
    result = validate_flagged_frame(_frame().drop(columns=["pixels"]), num_classes=10, modality=PIXELS)
    assert result.failed_checks == ("column `pixels` present",)


def test_malformed_pixels_and_correct_predictions_are_named_never_raised():
    frame = _frame()
    frame["pixels"] = frame["pixels"].astype(object)
    frame.at[0, "pixels"] = ["1.0"] * 64  # strings
    frame.at[1, "pixels"] = [[0.0] * 8] * 8  # nested 8x8 lists
    frame.at[2, "pixels"] = [1e39] * 64  # beyond float32
    result = validate_flagged_frame(frame, num_classes=10, modality=PIXELS)
    assert result.failed_checks == ("every `pixels` list holds 64 values",
                                    "every pixel value is a finite number within float32 range")
    right = _frame()
    right.loc[0, "predicted_label"] = right.loc[0, "true_label"]
    assert validate_flagged_frame(right, num_classes=10, modality=PIXELS).failed_checks == (
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
    from audit.modalities.pixels import RANGE_TOLERANCE

    frame = _frame()
    frame["pixels"] = frame["pixels"].astype(object)
    frame.at[0, "pixels"] = [0.0] * 63 + [16.5]  # one value above
    frame.at[1, "pixels"] = [-1.0] * 64  # all below
    result = validate_flagged_frame(frame, num_classes=10, modality=PIXELS, input_range=(0.0, 16.0))
    assert result.failed_checks == ("every `pixels` value within the model's training range [0, 16]: 2 rows outside",)
    # within the stated tolerance, RANGE_TOLERANCE x the range's width, a value still passes
    edge = _frame()
    edge.at[0, "pixels"] = [16.0 + 0.9 * RANGE_TOLERANCE * 16.0] * 64
    edge.at[1, "pixels"] = [-0.9 * RANGE_TOLERANCE * 16.0] * 64
    assert validate_flagged_frame(edge, num_classes=10, modality=PIXELS, input_range=(0.0, 16.0)).success
    edge.at[2, "pixels"] = [16.0 + 2 * RANGE_TOLERANCE * 16.0] * 64
    assert validate_flagged_frame(edge, num_classes=10, modality=PIXELS, input_range=(0.0, 16.0)).failed_checks == (
        "every `pixels` value within the model's training range [0, 16]: 1 row outside",)


def test_without_a_recorded_range_pixels_are_checked_for_finiteness_only():
    frame = _frame()
    frame.at[0, "pixels"] = [99.0] * 64
    assert validate_flagged_frame(frame, num_classes=10, modality=PIXELS).success
    # a non-finite row is named once, by the finiteness check, not again as out of range
    frame.at[1, "pixels"] = [float("inf")] * 64
    result = validate_flagged_frame(frame, num_classes=10, modality=PIXELS, input_range=(0.0, 16.0))
    assert result.failed_checks == ("every pixel value is a finite number within float32 range",
                                    "every `pixels` value within the model's training range [0, 16]: 1 row outside")


def test_a_batch_over_the_row_bound_fails_on_that_alone():
    frame = _frame()
    frame.loc[0, "true_label"] = 42  # not reported: a batch this size is refused before its rows are read
    result = validate_flagged_frame(frame, num_classes=10, modality=PIXELS, max_rows=2, input_range=(0.0, 16.0))
    assert not result.success
    assert result.failed_checks == ("at most 2 rows (`max_flagged`; this batch has 3)",)
    assert result.summary() == ("The flagged batch failed these checks: "
                                "at most 2 rows (`max_flagged`; this batch has 3).")
    assert validate_flagged_frame(_frame(), num_classes=10, modality=PIXELS, max_rows=3).success


def _text_frame(texts):
    return pd.DataFrame({"example_id": [f"s{i}" for i in range(len(texts))], "text": texts,
                         "predicted_label": [0] * len(texts), "true_label": [1] * len(texts)})


def test_a_text_batch_is_checked_for_non_empty_strings_under_the_character_cap():
    from audit.modalities import Text

    text = Text(16)
    assert validate_flagged_frame(_text_frame(["good film", "<b>bad</b> plot"]), num_classes=2, modality=text).success
    bad = _text_frame(["fine", None, "   ", "x" * (Text.max_chars + 1), 42])
    result = validate_flagged_frame(bad, num_classes=2, modality=text)
    assert result.failed_checks == ("every `text` is a non-empty string",
                                    f"every `text` holds at most {Text.max_chars} characters: 1 row longer")
    # a pixels batch sent to a text model names the missing column, and nothing about pixels
    result = validate_flagged_frame(_frame(), num_classes=10, modality=text)
    assert result.failed_checks == ("column `text` present",)


def _picture(color=(10, 200, 30)) -> bytes:
    import io

    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("RGB", (5, 3), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_batch_is_checked_for_pictures_that_decode(tmp_path):
    from audit.modalities import Image

    image = Image((4, 4), "RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    frame = pd.DataFrame({"example_id": ["a", "b"], "image": [_picture(), _picture((0, 0, 0))],
                          "predicted_label": [0, 1], "true_label": [1, 0]})
    assert validate_flagged_frame(frame, num_classes=2, modality=image).success
    frame.at[1, "image"] = b"\x89PNG but truncated"
    assert validate_flagged_frame(frame, num_classes=2, modality=image).failed_checks == (
        "every `image` holds an encoded picture that decodes",)
    # Parquet keeps the bytes: the batch as a user writes it
    path = tmp_path / "batch.parquet"
    frame.iloc[:1].to_parquet(path)
    assert validate_flagged_frame(pd.read_parquet(path), num_classes=2, modality=image).success


def test_an_image_path_batch_is_checked_for_files_under_the_root(tmp_path):
    from audit.modalities import Image

    image = Image((4, 4), "L", (0.5,), (0.25,))
    root = tmp_path / "flagged"
    root.mkdir()
    (root / "a.png").write_bytes(_picture())
    (tmp_path / "secret.png").write_bytes(_picture())
    frame = pd.DataFrame({"example_id": ["a"], "image_path": ["a.png"], "predicted_label": [0], "true_label": [1]})
    assert validate_flagged_frame(frame, num_classes=2, modality=image, root=root).success
    for bad in ("missing.png", "../secret.png"):
        result = validate_flagged_frame(frame.assign(image_path=[bad]), num_classes=2, modality=image, root=root)
        assert result.failed_checks == (f"every `image_path` names a picture file under the image root {root}",)
    assert not validate_flagged_frame(frame, num_classes=2, modality=image).success  # no root given
