"""SST-2 (binary sentence sentiment) as seeded train / validation / production samples with an
optional seeded label-noise injection, written as Parquet folders the demo records by reference.

An SST-2 folder holds `train.tsv`, `dev.tsv` and `test.tsv`, tab-separated, header
`label<TAB>sentence`, label 0 = negative, 1 = positive, no quoting (../shared/data/sst2 is the real
one; `tiny_sst2_sample` writes a small synthetic one for tests). Training examples are drawn from
`train.tsv` (GLUE's phrases); validation and production from `dev.tsv` + `test.tsv` (whole
sentences), so no example is in two splits, and no training text equals a validation or
production text. Example ids are `sst2-<file>-<row>` (0-based data row of that file), stable
across samples and seeds.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from audit.errors import InvalidInput

SST2_FILES = ("train.tsv", "dev.tsv", "test.tsv")
HEADER = ("label", "sentence")
NUM_CLASSES = 2
COLUMNS = ("example_id", "text", "label")  # of every frame here, and of the Parquet files written
SPLITS = ("train", "validation", "production")
PART_NAME = "part-0.parquet"  # the one file of each split's Parquet folder


def read_sst2_file(path: Path) -> pd.DataFrame:
    """One SST-2 TSV as a frame with `example_id` (`sst2-<stem>-<row>`), `text` (str) and `label`
    (int64, 0 or 1), in file order. InvalidInput (one sentence) when the file is missing, its
    header is not `label<TAB>sentence`, or a row has no sentence or a label other than 0 / 1."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"No SST-2 file {path.name} in {path.parent}: an SST-2 folder holds "
                           f"{', '.join(SST2_FILES)} (tab-separated, header `label<TAB>sentence`).")
    with path.open(encoding="utf-8", newline="") as handle:
        header = tuple(handle.readline().rstrip("\r\n").split("\t"))
    if header != HEADER:
        raise InvalidInput(f"{path} must start with the header `label<TAB>sentence`; found "
                           f"{'<TAB>'.join(header)!r}.")
    frame = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False,
                        encoding="utf-8")
    labels = pd.to_numeric(frame["label"], errors="coerce")
    bad = ~labels.isin([0, 1]) | (frame["sentence"].str.strip() == "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InvalidInput(f"{path} line {row + 2} needs a label 0 or 1 and a non-empty sentence; found "
                           f"label {frame['label'].iloc[row]!r} and sentence {frame['sentence'].iloc[row]!r}.")
    return pd.DataFrame({
        "example_id": [f"sst2-{path.stem}-{i:05d}" for i in range(len(frame))],
        "text": frame["sentence"].astype(str).to_numpy(),
        "label": labels.to_numpy(dtype=np.int64),
    })


def read_sst2(folder: Path) -> dict[str, pd.DataFrame]:
    """{"train", "dev", "test"}: the three files of an SST-2 folder (see `read_sst2_file`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInput(f"The SST-2 folder {folder} does not exist: it must hold {', '.join(SST2_FILES)}.")
    return {name.removesuffix(".tsv"): read_sst2_file(folder / name) for name in SST2_FILES}


@dataclass(frozen=True)
class TextSplits:
    """Disjoint labelled frames (columns `example_id`, `text`, `label`, default RangeIndex).
    `train` carries the (possibly noisy) training labels; `clean_train_labels` int64 [N_train] the
    original ones, known only to the demo (ground truth for relabel precision)."""

    train: pd.DataFrame
    clean_train_labels: np.ndarray
    validation: pd.DataFrame
    production: pd.DataFrame

    @property
    def flipped(self) -> np.ndarray:
        """Bool [N_train]: training examples whose label was flipped."""
        return self.train["label"].to_numpy() != self.clean_train_labels

    def relabel_precision(self, relabels: dict[str, int]) -> float | None:
        """Fraction in [0, 1] of `relabels` (train id -> new label) that restore a flipped label to
        its clean value; None when there are none. InvalidInput naming an id not in `train`."""
        if not relabels:
            return None
        position = {example_id: n for n, example_id in enumerate(self.train["example_id"])}
        missing = next((i for i in relabels if i not in position), None)
        if missing is not None:
            raise InvalidInput(f"Example {missing!r} is not in the training split.")
        flipped = self.flipped
        hits = sum(bool(flipped[position[i]]) and int(self.clean_train_labels[position[i]]) == int(y)
                   for i, y in relabels.items())
        return hits / len(relabels)

    def write(self, folder: Path) -> dict[str, Path]:
        """Write each split as a Parquet folder `folder/<split>/part-0.parquet` (columns
        `example_id`, `text`, `label` int64; train with its noisy labels). Returns
        {"train", "validation", "production"} -> that split's folder. Overwrites the part file."""
        return {name: write_parquet_dir(getattr(self, name), Path(folder) / name) for name in SPLITS}


def write_parquet_dir(frame: pd.DataFrame, folder: Path) -> Path:
    """`frame`'s `example_id`, `text`, `label` (int64) as `folder/part-0.parquet`; returns `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = pd.DataFrame({"example_id": frame["example_id"].astype(str).to_numpy(),
                        "text": frame["text"].astype(str).to_numpy(),
                        "label": frame["label"].to_numpy(dtype=np.int64)})
    out.to_parquet(folder / PART_NAME, index=False)
    return folder


def flip_labels(labels: np.ndarray, noise_rate: float, rng: np.random.Generator,
                num_classes: int = NUM_CLASSES) -> np.ndarray:
    """A copy of `labels` (int64 [N]) with exactly round(noise_rate * N) of them, drawn by `rng`,
    moved to a different, uniformly drawn class (for 2 classes: the other one)."""
    if not 0.0 <= noise_rate < 1.0:
        raise InvalidInput(f"noise_rate must be in [0, 1); got {noise_rate}.")
    noisy = np.asarray(labels, dtype=np.int64).copy()
    flip = rng.choice(len(noisy), size=int(round(noise_rate * len(noisy))), replace=False)
    noisy[flip] = (noisy[flip] + rng.integers(1, num_classes, size=len(flip))) % num_classes
    return noisy


def sample_sst2_splits(
    folder: Path, n_train: int = 2000, n_validation: int = 600, n_production: int = 600,
    noise_rate: float = 0.1, seed: int = 0, min_words: int = 1,
) -> TextSplits:
    """Seeded samples of an SST-2 folder: `n_train` distinct phrases of `train.tsv` with at least
    `min_words` space-separated words and a text found in neither `dev.tsv` nor `test.tsv`; then
    `n_validation` and `n_production` distinct sentences of `dev.tsv` + `test.tsv`; then
    `noise_rate` of the training labels flipped (seeded). Same folder and arguments, same splits.
    InvalidInput when a count is not positive or the folder holds fewer eligible examples."""
    for name, n in (("n_train", n_train), ("n_validation", n_validation), ("n_production", n_production)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInput(f"{name} must be a positive integer; got {n!r}.")
    if not 0.0 <= noise_rate < 1.0:
        raise InvalidInput(f"noise_rate must be in [0, 1); got {noise_rate}.")
    files = read_sst2(folder)
    held = pd.concat([files["dev"], files["test"]], ignore_index=True).drop_duplicates("text", ignore_index=True)
    train_pool = files["train"].drop_duplicates("text", ignore_index=True)
    train_pool = train_pool[~train_pool["text"].isin(set(held["text"]))
                            & (train_pool["text"].str.split().str.len() >= min_words)].reset_index(drop=True)
    if len(train_pool) < n_train:
        raise InvalidInput(f"{folder}/train.tsv holds {len(train_pool)} distinct phrases of at least {min_words} "
                           f"words that are not dev/test sentences, fewer than n_train={n_train}.")
    if len(held) < n_validation + n_production:
        raise InvalidInput(f"{folder}/dev.tsv and test.tsv hold {len(held)} distinct sentences, fewer than "
                           f"n_validation + n_production = {n_validation + n_production}.")
    rng = np.random.default_rng(seed)
    train = train_pool.iloc[np.sort(rng.choice(len(train_pool), size=n_train, replace=False))]
    order = rng.permutation(len(held))
    validation = held.iloc[np.sort(order[:n_validation])]
    production = held.iloc[np.sort(order[n_validation:n_validation + n_production])]
    train, validation, production = (f.reset_index(drop=True) for f in (train, validation, production))
    clean = train["label"].to_numpy(dtype=np.int64)
    noisy = train.assign(label=flip_labels(clean, noise_rate, rng))
    return TextSplits(noisy, clean, validation, production)


# -- a small synthetic SST-2-shaped folder for tests (no ../shared needed) -------------------------

# Every word is in tests/text_helpers.WORDS (the tiny BERT's vocabulary), so nothing maps to [UNK].
SUBJECTS = ("the movie", "the film", "the plot", "the acting", "the story", "the music", "the ending", "it")
VERBS = ("is", "was")
ADVERBS = ("", "very ")
POSITIVE = ("good", "great", "fun", "funny", "best")
NEGATIVE = ("bad", "awful", "boring", "slow", "worst")


def tiny_sst2_sentences() -> list[tuple[str, int]]:
    """Every templated (sentence, label) pair, in a fixed order: `<subject> <verb> [very] <adj>`
    and `<subject> <verb> [very] <adj> and <adj2>` with adjectives of one polarity (label 1
    positive, 0 negative): 1,600 distinct sentences, half positive."""
    out = []
    for label, words in ((1, POSITIVE), (0, NEGATIVE)):
        for subject, verb, adverb in itertools.product(SUBJECTS, VERBS, ADVERBS):
            out += [(f"{subject} {verb} {adverb}{adj}", label) for adj in words]
            out += [(f"{subject} {verb} {adverb}{a} and {b}", label) for a, b in itertools.permutations(words, 2)]
    return list(dict.fromkeys(out))


def tiny_sst2_sample(folder: Path, n_train: int = 200, n_dev: int = 60, n_test: int = 60, seed: int = 0) -> Path:
    """Write a synthetic SST-2 folder (`train.tsv`, `dev.tsv`, `test.tsv`, header
    `label<TAB>sentence`) of distinct templated sentences (`tiny_sst2_sentences`, drawn with
    `seed`, none in two files), sentiment-shaped so a small model learns it. Returns `folder`."""
    pool = tiny_sst2_sentences()
    total = n_train + n_dev + n_test
    if min(n_train, n_dev, n_test) < 1 or total > len(pool):
        raise InvalidInput(f"tiny_sst2_sample needs positive counts adding up to at most {len(pool)}; got "
                           f"{n_train}, {n_dev} and {n_test}.")
    order = np.random.default_rng(seed).permutation(len(pool))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bounds = {"train.tsv": (0, n_train), "dev.tsv": (n_train, n_train + n_dev), "test.tsv": (n_train + n_dev, total)}
    for name, (start, stop) in bounds.items():
        rows = [pool[i] for i in order[start:stop]]
        (folder / name).write_text("label\tsentence\n" + "".join(f"{y}\t{s}\n" for s, y in rows), encoding="utf-8")
    return folder
