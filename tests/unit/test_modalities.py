"""Modalities (audit/modalities): what a model's input is in a data frame and how it is encoded.
Each one: its run params read back to an equal instance through ModelSpec, the table's shapes,
dtypes and display, and one-sentence refusals. Text uses a real BertTokenizerFast built from a
vocab file (tests/text_helpers.py), images real PNG/JPEG bytes made with Pillow."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from audit.errors import InvalidInput, LineageError
from audit.examples import ExampleTable, pixel_frame
from audit.modalities import Image, Modality, Pixels, Text, find, modality_from_params, names, register
from registry_hooks.model_io import ModelSpec


def _png(color, size=(6, 4), mode="RGB", fmt="PNG") -> bytes:
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new(mode, size, color).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tokenizer():
    from tests.text_helpers import tiny_tokenizer

    return tiny_tokenizer()


# --- params round trip through ModelSpec -------------------------------------------------------

SPECS = {
    "pixels": ModelSpec((1, 8, 8), 10, (0.0, 16.0)),
    "text": ModelSpec((12,), 2, modality=Text(12)),
    "image": ModelSpec((3, 4, 5), 3, modality=Image((4, 5), "RGB", (0.5, 0.25, 0.125), (0.2, 0.3, 0.4))),
    "image-gray": ModelSpec((1, 4, 4), 3, modality=Image((4, 4), "L", (0.1,), (0.3,))),
}


@pytest.mark.parametrize("name", SPECS)
def test_a_spec_reads_back_its_modality_from_its_params(name):
    spec = SPECS[name]
    params = spec.params()
    assert params["modality"] == spec.modality.name
    assert all(isinstance(v, str) for v in params.values())
    assert ModelSpec.from_params(params) == spec


def test_recorded_params_of_each_modality():
    assert SPECS["text"].params()["text_max_length"] == "12"
    image = SPECS["image"].params()
    assert (image["image_size"], image["image_mode"], image["image_mean"], image["image_std"]) == (
        "4x5", "RGB", "0.5,0.25,0.125", "0.2,0.3,0.4")
    assert "text_max_length" not in SPECS["pixels"].params()
    assert "input_min" not in ModelSpec((12,), 2, modality=Text(12)).params()


def test_a_run_without_a_modality_param_is_pixels():
    older = {"input_shape": "1x8x8", "num_classes": "10", "input_min": "0.0", "input_max": "16.0"}
    spec = ModelSpec.from_params(older)
    assert spec.modality == Pixels((1, 8, 8)) and spec == SPECS["pixels"]
    assert ModelSpec((1, 8, 8), 10).modality == Pixels((1, 8, 8))


@pytest.mark.parametrize(("params", "named"), [
    ({"modality": "audio"}, "'audio'"),
    ({"modality": "text"}, "text_max_length"),
    ({"modality": "text", "text_max_length": "zero"}, "text_max_length"),
    ({"modality": "text", "text_max_length": "8"}, "input_shape"),  # 8 tokens, but input_shape says 12
    ({"modality": "image", "image_size": "4x4", "image_mode": "CMYK", "image_mean": "0", "image_std": "1"},
     "image_size"),
    ({"modality": "image", "image_size": "4x4", "image_mode": "L", "image_mean": "0", "image_std": "0"},
     "image_std"),
])
def test_unusable_modality_params_are_a_lineage_error(params, named):
    with pytest.raises(LineageError, match=named) as refused:
        ModelSpec.from_params({"input_shape": "12", "num_classes": "2", **params})
    assert "\n" not in str(refused.value)


def test_a_spec_whose_shape_differs_from_its_modality_is_refused_in_one_sentence():
    with pytest.raises(InvalidInput, match=r"input_shape \(10,\) differs from the text modality's input shape "
                                           r"\(12,\)\.$"):
        ModelSpec((10,), 2, modality=Text(12))
    with pytest.raises(InvalidInput, match="image modality"):
        ModelSpec((3, 4, 4), 2, modality=Image((4, 4), "L", (0.0,), (1.0,)))
    with pytest.raises(InvalidInput, match="must be a modality"):
        ModelSpec((12,), 2, modality="text")


def test_the_registry_finds_the_builtins_and_refuses_a_second_registration():
    assert names()[:3] == ("pixels", "text", "image") and find("text") is Text and find(3) is None
    assert modality_from_params({"input_shape": "1x2x2"}) == Pixels((1, 2, 2))
    with pytest.raises(InvalidInput, match="already registered"):
        register(Text)

    class Tabular(Modality):
        name = "tabular_test"
        columns = ("features",)

        @classmethod
        def from_params(cls, params):
            return cls()

        def input_shape(self):
            return (3,)

        def table(self, frame, *, label_column="label", tokenizer=None, root=None):
            raise NotImplementedError

        def input_checks(self, frame, *, input_range=None, root=None):
            return []

    with register(Tabular):
        assert ModelSpec.from_params({"input_shape": "3", "num_classes": "2", "modality": "tabular_test"}).modality \
            == Tabular()
    assert find("tabular_test") is None


# --- pixels ------------------------------------------------------------------------------------

def test_pixels_table_is_float32_in_the_input_shape_without_display():
    table = ExampleTable(("a", "b"), torch.rand(2, 1, 8, 8) * 16, torch.tensor([3, 4]))
    back = Pixels((1, 8, 8)).table(pixel_frame(table))
    assert back.inputs.dtype == torch.float32 and back.inputs.shape == (2, 1, 8, 8) and back.display is None
    assert back.ids == ("a", "b") and back.labels.dtype == torch.int64 and back.labels.tolist() == [3, 4]
    assert torch.allclose(back.inputs, table.inputs)
    with pytest.raises(InvalidInput, match="must hold 16 values.*found lengths \\[64\\]"):
        Pixels((1, 4, 4)).table(pixel_frame(table))
    with pytest.raises(InvalidInput, match="positive integers"):
        Pixels((0, 8))


# --- text --------------------------------------------------------------------------------------

def test_text_table_is_padded_truncated_token_ids_with_the_texts_as_display(tokenizer):
    texts = ["the movie was good", "bad " * 30, "zzz unknown"]
    frame = pd.DataFrame({"example_id": [1, 2, 3], "text": texts, "label": [1, 0, 1]})
    table = Text(8).table(frame, tokenizer=tokenizer)
    assert table.inputs.dtype == torch.int64 and table.inputs.shape == (3, 8)
    assert table.display == tuple(texts) and table.ids == ("1", "2", "3") and table.labels.tolist() == [1, 0, 1]
    cls, sep, pad, unk = (tokenizer.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))
    first = tokenizer.convert_tokens_to_ids(["the", "movie", "was", "good"])
    assert table.inputs[0].tolist() == [cls, *first, sep, pad, pad]
    assert table.inputs[1, 0] == cls and table.inputs[1, -1] == sep and (table.inputs[1] != pad).all()  # truncated
    assert table.inputs[2].tolist()[:4] == [cls, unk, unk, sep]
    # the display follows the rows through subset and relabelling
    assert table.subset([2, 0]).display == (texts[2], texts[0])
    assert table.relabelled({"2": 1}).display == tuple(texts)


def test_text_needs_the_tokenizer_and_strings(tokenizer):
    frame = pd.DataFrame({"example_id": ["a"], "text": ["good"], "label": [0]})
    with pytest.raises(InvalidInput, match="needs the tokenizer of a `transformers` model kind") as refused:
        Text(8).table(frame)
    assert str(refused.value).count(".") == 1
    with pytest.raises(InvalidInput, match="non-empty string"):
        Text(8).table(frame.assign(text=[None]), tokenizer=tokenizer)
    with pytest.raises(InvalidInput, match="positive integer"):
        Text(0)


def test_the_spec_of_a_loaded_text_model_tokenizes_with_its_kinds_tokenizer(tokenizer):
    from registry_hooks.model_kinds.transformers import TransformersModel

    frame = pd.DataFrame({"example_id": ["a"], "text": ["fun film"], "true_label": [1]})
    spec = ModelSpec((6,), 2, kind=TransformersModel(tokenizer=tokenizer), modality=Text(6))
    table = spec.table(frame, label_column="true_label")
    assert table.inputs.shape == (1, 6) and table.labels.tolist() == [1] and table.display == ("fun film",)
    with pytest.raises(InvalidInput, match="tokenizer"):
        SPECS["text"].table(frame, label_column="true_label")  # a spec resolved from params, before loading


# --- image -------------------------------------------------------------------------------------

def test_image_bytes_are_decoded_converted_resized_and_normalised():
    frame = pd.DataFrame({"example_id": ["red", "gray"], "image": [_png((255, 0, 0)), _png((51, 51, 51), fmt="JPEG")],
                          "label": [0, 2]})
    rgb = Image((4, 5), "RGB", (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    table = rgb.table(frame)
    assert table.inputs.dtype == torch.float32 and table.inputs.shape == (2, 3, 4, 5) and table.display is None
    assert table.labels.tolist() == [0, 2]
    red = table.inputs[0]
    torch.testing.assert_close(red[0], torch.full((4, 5), 1.0))  # (1 - 0.5) / 0.5
    torch.testing.assert_close(red[1], torch.full((4, 5), -1.0))  # (0 - 0.25) / 0.25
    torch.testing.assert_close(red[2], torch.zeros(4, 5))
    gray = Image((3, 3), "L", (0.0,), (1.0,)).table(frame)
    assert gray.inputs.shape == (2, 1, 3, 3)
    assert abs(float(gray.inputs[1].mean()) - 0.2) < 0.02  # JPEG is lossy; 51 / 255 = 0.2
    with pytest.raises(InvalidInput, match="one positive std|finite mean"):
        Image((4, 4), "RGB", (0.0,), (1.0,))


def test_image_paths_resolve_under_the_root_and_never_outside(tmp_path):
    root = tmp_path / "pictures"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "one.png").write_bytes(_png((0, 0, 255)))
    (tmp_path / "outside.png").write_bytes(_png((0, 0, 255)))
    modality = Image((2, 2), "RGB", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    frame = pd.DataFrame({"example_id": ["c1"], "image_path": ["cats/one.png"], "label": [1]})
    table = modality.table(frame, root=root)
    assert table.inputs.shape == (1, 3, 2, 2) and float(table.inputs[0, 2].min()) == 1.0
    for escaping in ("../outside.png", str(tmp_path / "outside.png"), "cats/../../outside.png"):
        with pytest.raises(InvalidInput, match="escapes the image root"):
            modality.table(frame.assign(image_path=[escaping]), root=root)
    with pytest.raises(InvalidInput, match="needs the root folder"):
        modality.table(frame)
    with pytest.raises(InvalidInput, match="names no file"):
        modality.table(frame.assign(image_path=["cats/two.png"]), root=root)


def test_undecodable_image_bytes_name_the_example():
    frame = pd.DataFrame({"example_id": ["ok", "broken"], "image": [_png((1, 2, 3)), b"not a picture"],
                          "label": [0, 1]})
    with pytest.raises(InvalidInput, match="^Example 'broken': Cannot decode a picture") as refused:
        Image((2, 2), "L", (0.0,), (1.0,)).table(frame)
    assert "\n" not in str(refused.value)
    with pytest.raises(InvalidInput, match="bytes"):
        Image((2, 2), "L", (0.0,), (1.0,)).table(frame.assign(image=["a string", np.nan]))
