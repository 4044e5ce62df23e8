"""Training data read where it lives (audit/datasets.py): Parquet files and folders, Hugging Face
datasets saved to disk, image folders; local paths and fsspec URLs; the streaming content digest."""

import io
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from audit.datasets import (
    ContentDigest,
    DataSource,
    SourceMissing,
    frame_digest,
    iter_frames,
    read_tables,
    summarize,
)
from audit.errors import InvalidInput, LineageError

RENAMES = {"idx": "example_id", "sentence": "text"}


def _sst2_like(n=11):
    """An SST-2-shaped frame: integer `idx`, `sentence`, binary `label`."""
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "dull", "warm"]
    return pd.DataFrame({"idx": np.arange(n, dtype=np.int64),
                         "sentence": [" ".join(rng.choice(words, size=1 + i % 4)) for i in range(n)],
                         "label": rng.integers(0, 2, size=n)})


def _product(frame):
    """What a reader yields for `_sst2_like`: renamed, ids as strings, in the product's order."""
    out = frame.rename(columns=RENAMES)[["example_id", "label", "text"]].copy()
    out["example_id"] = out["example_id"].astype(str)
    return out.reset_index(drop=True)


def _read_all(source, chunk_rows):
    return pd.concat(list(iter_frames(source, chunk_rows)), ignore_index=True)


def _png(value, size=(3, 3)):
    buffer = io.BytesIO()
    Image.new("L", size, color=value).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_parquet_file_reads_back_renamed_with_the_digest_of_its_rows(tmp_path):
    frame = _sst2_like()
    frame.to_parquet(tmp_path / "train.parquet", index=False)
    source = DataSource(str(tmp_path / "train.parquet"), "parquet", RENAMES)
    read = _read_all(source, 4)
    pd.testing.assert_frame_equal(read, _product(frame))
    summary = summarize(source)
    assert summary.num_rows == len(frame) and summary.schema.names == ["example_id", "label", "text"]
    assert summary.digest == frame_digest(_product(frame))


def test_chunk_size_and_file_layout_change_neither_the_digest_nor_the_rows(tmp_path):
    frame = _sst2_like(23)
    frame.to_parquet(tmp_path / "one.parquet", index=False)
    folder = tmp_path / "parts"
    folder.mkdir()
    # three files, one with a narrower label type; a marker file the reader skips
    frame.iloc[:5].to_parquet(folder / "part-0.parquet", index=False)
    frame.iloc[5:17].astype({"label": "int32"}).to_parquet(folder / "part-1.parquet", index=False)
    frame.iloc[17:].to_parquet(folder / "part-2.parquet", index=False)
    (folder / "_SUCCESS").write_text("")
    one, parts = DataSource(str(tmp_path / "one.parquet"), columns=RENAMES), DataSource(str(folder), columns=RENAMES)
    digests = {summarize(source, chunk_rows).digest for source in (one, parts) for chunk_rows in (1, 4, 7, 1000)}
    assert len(digests) == 1
    for chunk_rows in (1, 4, 7, 1000):
        sizes = [t.num_rows for t in read_tables(parts, chunk_rows)]
        assert sizes[:-1] == [chunk_rows] * (len(sizes) - 1) and sum(sizes) == 23
        pd.testing.assert_frame_equal(_read_all(parts, chunk_rows), _product(frame))


def test_the_digest_sees_one_edited_label_text_order_or_column_name():
    frame = _product(_sst2_like())
    base = frame_digest(frame)
    relabelled, edited = frame.copy(), frame.copy()
    relabelled.loc[3, "label"] = 1 - relabelled.loc[3, "label"]
    edited.loc[5, "text"] = edited.loc[5, "text"] + "!"
    swapped = frame.iloc[[1, 0, *range(2, len(frame))]]
    renamed = frame.rename(columns={"text": "sentence"})
    moved = frame.copy()  # the same characters split differently between two rows
    first, second = frame.loc[0, "text"], frame.loc[1, "text"]
    moved.loc[0, "text"], moved.loc[1, "text"] = first + second[:1], second[1:]
    others = [frame_digest(f) for f in (relabelled, edited, swapped, renamed, moved)]
    assert base not in others and len(set(others)) == len(others)
    assert frame_digest(frame.set_axis(range(100, 100 + len(frame)))) == base  # not the pandas index


def test_pixel_lists_digest_by_value_whatever_their_float_width():
    frame = pd.DataFrame({"example_id": ["a", "b"], "label": [1, 2], "pixels": [[0.5, 1.0], [2.0, 3.0]]})
    narrow = frame.assign(pixels=[np.array(p, dtype=np.float32) for p in frame["pixels"]])
    assert frame_digest(frame) == frame_digest(narrow)
    assert frame_digest(frame) != frame_digest(frame.assign(pixels=[[0.5, 1.0], [2.0, 3.5]]))
    assert frame_digest(frame) != frame_digest(frame.assign(pixels=[[0.5], [1.0, 2.0, 3.0]]))  # same values, split


def test_a_hugging_face_dataset_saved_to_disk_reads_like_the_same_rows_in_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    frame = _sst2_like(9)
    features = datasets.Features({"idx": datasets.Value("int32"), "sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    def split(rows):
        return datasets.Dataset.from_pandas(rows, features=features, preserve_index=False)

    splits = datasets.DatasetDict({"train": split(frame), "validation": split(frame.iloc[:3])})
    splits.save_to_disk(str(tmp_path / "sst2"), num_shards={"train": 3, "validation": 1})  # 3 Arrow files
    source = DataSource(str(tmp_path / "sst2" / "train"), "huggingface", RENAMES)
    pd.testing.assert_frame_equal(_read_all(source, 2), _product(frame))
    assert summarize(source, 2).digest == summarize(source, 50).digest == frame_digest(_product(frame))
    with pytest.raises(InvalidInput, match=r"is a DatasetDict saved to disk \(splits: train, validation\); "
                                           r"point at one split's folder, e.g. .*sst2/train\.$"):
        summarize(DataSource(str(tmp_path / "sst2"), "huggingface", RENAMES))


def test_an_image_folder_reads_as_torchvision_labels_it_with_relative_ids_and_file_bytes(tmp_path):
    from torchvision.datasets import ImageFolder

    root = tmp_path / "images"
    for cls, values in {"dog": [10, 20], "cat": [30, 40, 50], "zebra": [60]}.items():
        (root / cls / "sub").mkdir(parents=True)
        for n, value in enumerate(values):
            (root / cls / (f"{n}.png" if n % 2 == 0 else f"sub/{n}.PNG")).write_bytes(_png(value))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(_png(0))
    source = DataSource(str(root), "imagefolder")
    read = _read_all(source, 2)
    reference = ImageFolder(str(root), is_valid_file=lambda p: not p.rsplit("/", 1)[-1].startswith(".")
                            and p.lower().endswith(".png"))
    assert read["example_id"].tolist() == [str(Path(path).relative_to(root)) for path, _ in reference.samples]
    assert read["label"].tolist() == [label for _, label in reference.samples]
    assert read["image"].tolist() == [(root / i).read_bytes() for i in read["example_id"]]
    assert summarize(source, 1).digest == summarize(source, 100).digest == frame_digest(read)
    (root / "empty").mkdir()
    with pytest.raises(InvalidInput, match="class folder 'empty' .* holds no image files"):
        summarize(source)


def test_fsspec_urls_read_the_same_data_as_local_paths(tmp_path):
    frame = _sst2_like(7)
    frame.to_parquet(tmp_path / "train.parquet", index=False)
    local = summarize(DataSource(str(tmp_path / "train.parquet"), columns=RENAMES)).digest
    assert summarize(DataSource((tmp_path / "train.parquet").as_uri(), columns=RENAMES), 3).digest == local
    memory = fsspec.filesystem("memory")
    base = f"/test-datasets-{uuid.uuid4().hex}"
    try:
        with memory.open(f"{base}/train/part-0.parquet", "wb") as handle:
            frame.to_parquet(handle, index=False)
        assert summarize(DataSource(f"memory://{base}/train", columns=RENAMES), 2).digest == local
        for cls, value in (("a", 1), ("b", 2)):
            memory.pipe(f"{base}/images/{cls}/x.png", _png(value))
        read = _read_all(DataSource(f"memory://{base}/images", "imagefolder"), 1)
        assert read["example_id"].tolist() == ["a/x.png", "b/x.png"] and read["label"].tolist() == [0, 1]
    finally:
        memory.rm(base, recursive=True)


def test_inputs_restricts_the_columns_read(tmp_path):
    frame = _sst2_like(5).assign(note="ignored")
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    read = _read_all(DataSource(str(tmp_path / "t.parquet"), columns=RENAMES, inputs=("text",)), 10)
    assert list(read.columns) == ["example_id", "label", "text"]
    everything = _read_all(DataSource(str(tmp_path / "t.parquet"), columns=RENAMES), 10)
    assert list(everything.columns) == ["example_id", "label", "text", "note"]


def test_a_missing_source_a_missing_column_and_an_unreadable_file_are_one_sentence_each(tmp_path):
    with pytest.raises(SourceMissing, match=r"^No data at .*nowhere\.parquet\.$") as missing:
        summarize(DataSource(str(tmp_path / "nowhere.parquet")))
    assert isinstance(missing.value, LineageError)
    _sst2_like().to_parquet(tmp_path / "t.parquet", index=False)
    with pytest.raises(InvalidInput, match=r"has no column `example_id`, `text` \(it has idx, sentence, label\); "
                                           "map source columns"):
        summarize(DataSource(str(tmp_path / "t.parquet"), inputs=("text",)))
    with pytest.raises(InvalidInput, match="has no column 'sentense' to rename"):
        summarize(DataSource(str(tmp_path / "t.parquet"), columns={"sentense": "text", "idx": "example_id"}))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(LineageError, match=r"^Cannot read .*junk\.parquet as Parquet \("):
        summarize(DataSource(str(tmp_path / "junk.parquet")))
    (tmp_path / "hf").mkdir()
    with pytest.raises(LineageError, match="is not a Hugging Face dataset saved with save_to_disk"):
        summarize(DataSource(str(tmp_path / "hf"), "huggingface"))
    with pytest.raises(InvalidInput, match="Unknown data format 'csv'"):
        DataSource(str(tmp_path / "t.parquet"), "csv")


def test_missing_values_and_text_labels_are_refused():
    frame = _product(_sst2_like(4))
    with pytest.raises(InvalidInput, match="Column `text` has missing values"):
        frame_digest(frame.assign(text=["a", None, "c", "d"]))
    with pytest.raises(InvalidInput, match="Column `label` of <frame> must hold integer class indices; found "):
        frame_digest(frame.assign(label=["pos", "neg", "pos", "neg"]))


def test_a_digest_refuses_chunks_with_other_columns():
    import pyarrow as pa

    digest = ContentDigest()
    digest.update(pa.table({"example_id": ["a"], "label": [1]}))
    with pytest.raises(InvalidInput, match="differ from the first chunk's"):
        digest.update(pa.table({"label": [1], "example_id": ["a"]}))
