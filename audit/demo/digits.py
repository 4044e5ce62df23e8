"""scikit-learn's digits (1,797 real 8x8 handwritten digits, shipped with scikit-learn) as
seeded train / validation / production splits, with an optional seeded label-noise injection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from audit.examples import ExampleTable

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsSplits:
    """Disjoint splits. `train` carries the (possibly noisy) training labels; `clean_train_labels`
    the original ones, known only to the demo (ground truth for relabel precision)."""

    train: ExampleTable
    clean_train_labels: torch.Tensor
    validation: ExampleTable
    production: ExampleTable

    @property
    def flipped(self) -> torch.Tensor:
        """Bool [N_train]: training examples whose label was flipped."""
        return self.train.labels != self.clean_train_labels

    def relabel_precision(self, relabels: dict[str, int]) -> float | None:
        """Fraction in [0, 1] of `relabels` (train id -> new label) that restore a flipped label to
        its clean value; None when there are none. Only the demo knows the clean labels."""
        if not relabels:
            return None
        positions = self.train.positions(list(relabels))
        hits = sum(bool(self.flipped[i]) and int(self.clean_train_labels[i]) == y
                   for i, y in zip(positions, relabels.values(), strict=True))
        return hits / len(relabels)


def load_digits_splits(
    noise_rate: float = 0.1, seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> DigitsSplits:
    """Split digits by `fractions` (train, validation, production) with a seeded permutation and
    flip `noise_rate` of the training labels to a different, uniformly drawn class.

    Pixels stay raw (0..16); the model normalises. Example ids are `digits-<row>` (row of
    sklearn's array), stable across runs and seeds.
    """
    from sklearn.datasets import load_digits

    if not 0.0 <= noise_rate < 1.0:
        raise ValueError(f"noise_rate must be in [0, 1); got {noise_rate}.")
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # [1797, 1, 8, 8]
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    ids = np.array([f"digits-{i:04d}" for i in range(len(labels))])

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_train = int(round(fractions[0] * len(order)))
    n_val = int(round(fractions[1] * len(order)))
    parts = np.split(order, [n_train, n_train + n_val])

    def table(idx: np.ndarray) -> ExampleTable:
        t = torch.as_tensor(idx)
        return ExampleTable(tuple(ids[idx]), images[t], labels[t])

    train = table(parts[0])
    clean = train.labels.clone()
    noisy = clean.clone()
    flip = rng.choice(len(noisy), size=int(round(noise_rate * len(noisy))), replace=False)
    shift = torch.as_tensor(rng.integers(1, NUM_CLASSES, size=len(flip)))
    noisy[torch.as_tensor(flip)] = (clean[torch.as_tensor(flip)] + shift) % NUM_CLASSES
    return DigitsSplits(train.with_labels(noisy), clean, table(parts[1]), table(parts[2]))
