import numpy as np
import pytest
import torch

from audit.errors import InvalidInput
from audit.examples import ExampleTable, content_digest, pixel_frame
from audit.modalities import Pixels


def _table(n=5):
    g = torch.Generator().manual_seed(0)
    return ExampleTable(tuple(f"id-{i}" for i in range(n)), torch.rand(n, 1, 8, 8, generator=g) * 16,
                        torch.arange(n) % 10)


def test_pixel_frame_round_trip_keeps_ids_inputs_labels():
    table = _table()
    back = Pixels((1, 8, 8)).table(pixel_frame(table))
    assert back.ids == table.ids
    assert torch.equal(back.labels, table.labels)
    assert torch.allclose(back.inputs, table.inputs)


def test_content_digest_sees_edits_inside_pixel_lists():
    frame = pixel_frame(_table())
    edited = frame.copy()
    edited.at[2, "pixels"] = [v + 1.0 for v in edited.at[2, "pixels"]]
    assert content_digest(frame) == content_digest(frame.copy())
    assert content_digest(frame) != content_digest(edited)


def test_content_digest_ignores_the_index():
    frame = pixel_frame(_table())
    assert content_digest(frame) == content_digest(frame.set_axis(np.arange(10, 15)))


def test_wrong_pixel_count_is_one_clear_error():
    frame = pixel_frame(_table())
    with pytest.raises(InvalidInput, match="must hold 16 values.*found lengths \\[64\\]"):
        Pixels((1, 4, 4)).table(frame)


def test_digits_noise_flips_exactly_the_requested_fraction(digits_splits):
    flipped = digits_splits.flipped
    assert flipped.sum().item() == round(0.1 * len(digits_splits.train))
    assert not set(digits_splits.train.ids) & set(digits_splits.production.ids)
    assert not set(digits_splits.validation.ids) & set(digits_splits.production.ids)


def test_relabelled_replaces_only_the_named_labels():
    import torch

    from audit.examples import ExampleTable

    table = ExampleTable(("a", "b", "c"), torch.zeros(3, 1, 8, 8), torch.tensor([1, 2, 3]))
    edited = table.relabelled({"c": 7, "a": 0})
    assert edited.labels.tolist() == [0, 2, 7] and edited.ids == table.ids and table.labels.tolist() == [1, 2, 3]
