"""The image demo's data and model: scikit-learn's digits (`audit.demo.digits` splits, noisy
training labels included) written as PNG files in torchvision's ImageFolder layout, and a
torchvision architecture trained on them as the `image` modality encodes them.

Layout under a folder: `train/<label>/<digits id>.png` (the NOISY label: a flipped digit sits in
the wrong class folder, as a mislabelled image does in a real folder), `validation/<label>/...`
and `production/<label>/...` (true labels). Class folders `0`..`9` (sorted = label order).
Each PNG is the 8x8 digit, mode "L", pixel = round(raw * 255 / 16) (raw 0..16). The files and
their bytes depend only on the splits (deterministic), so their content digest is stable.

Example ids are what the image-folder reader gives: the file's path relative to its root,
e.g. `3/digits-0042.png`; `DigitsImageFolders.splits` re-keys the digits splits to those ids so
that `relabel_precision` reads a repair's label edits directly.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from audit.demo.digits import NUM_CLASSES, DigitsSplits
from audit.errors import InvalidInput
from audit.examples import ExampleTable
from audit.training import TrainConfig, train

SPLITS = ("train", "validation", "production")
PIXEL_MAX = 16.0
# The modality's transform (run params image_size / image_mode / image_mean / image_std): digits
# upsampled to 32 x 32 (bilinear) so that resnet18's stride-32 trunk still ends on a 1 x 1 map,
# replicated to 3 channels (torchvision classifiers take RGB), normalised with the training
# pictures' own statistics after that resize (measured over all 1,797 digits at 32 x 32: mean
# 0.3055, std 0.3235 of [0, 1] values; one value per channel, the three channels being equal).
IMAGE_SIZE = (32, 32)
IMAGE_MODE = "RGB"
IMAGE_MEAN = (0.305, 0.305, 0.305)
IMAGE_STD = (0.324, 0.324, 0.324)
# torchvision.models.get_model(TORCHVISION_BUILDER, **TORCHVISION_KWARGS), 11.2M parameters.
# Measured on 1,078 training digits (10% flipped), 1 thread of a loaded 2-core machine: 7.8 s per
# epoch at 32 x 32 (5.9 s at 16 x 16); validation accuracy 93.1% after 15 epochs at lr 1e-3,
# 94.6% after 25 at 2e-3. squeezenet1_1 (no BatchNorm; ReLU on its logits) reached 36% and
# mobilenet_v3_small 12% in the same recipe. resnet18 has BatchNorm: a fine-tune in train mode on
# 5 examples (20 steps) updated the running statistics and dropped validation accuracy from 94.6%
# to 64.0%; with the BatchNorm layers kept in eval mode it stayed at 94.4%.
TORCHVISION_BUILDER = "resnet18"
TORCHVISION_KWARGS = {"num_classes": NUM_CLASSES}


def digit_png(pixels: torch.Tensor | np.ndarray) -> bytes:
    """One digit (raw values 0..16, any shape with H x W last, e.g. [1, 8, 8]) as PNG bytes, mode
    "L", pixel = round(raw * 255 / 16) clipped to 0..255. Deterministic."""
    from PIL import Image

    array = np.asarray(pixels, dtype=np.float64)
    array = array.reshape(array.shape[-2:])
    grey = np.clip(np.rint(array * 255.0 / PIXEL_MAX), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(grey, mode="L").save(out, format="PNG")
    return out.getvalue()


@dataclass(frozen=True)
class DigitsImageFolders:
    """The written folders: `roots` {"train", "validation", "production"} -> ImageFolder root, and
    `splits`: the digits splits with ids replaced by their files' paths relative to their root
    (`<label>/<digits id>.png`, the train label being the noisy one), inputs and labels unchanged."""

    roots: dict[str, Path]
    splits: DigitsSplits = field(repr=False)


def _relative_paths(table: ExampleTable) -> tuple[str, ...]:
    return tuple(f"{int(y)}/{i}.png" for i, y in zip(table.ids, table.labels.tolist(), strict=True))


def write_digits_image_folders(splits: DigitsSplits, folder: Path) -> DigitsImageFolders:
    """Write `splits` as PNG files in ImageFolder layout under `folder/train`, `folder/validation`
    and `folder/production` (module docstring); every class folder 0..9 is created, and each must
    receive at least one picture (the image-folder reader refuses an empty class). InvalidInput
    when a root already holds files: a folder is written once, so its digest stays what was
    recorded."""
    folder = Path(folder)
    tables = {"train": splits.train, "validation": splits.validation, "production": splits.production}
    roots = {name: folder / name for name in SPLITS}
    for name, root in roots.items():
        if root.exists() and any(root.iterdir()):
            raise InvalidInput(f"{root} already holds files; write the digits image folders to an empty folder.")
        present = set(tables[name].labels.tolist())
        if present != set(range(NUM_CLASSES)):
            missing = sorted(set(range(NUM_CLASSES)) - present)
            raise InvalidInput(f"The {name} split has no digit labelled {missing[0]}, so its image folder would have "
                               "an empty class folder; use a larger split.")
    for name, table in tables.items():
        for c in range(NUM_CLASSES):
            (roots[name] / str(c)).mkdir(parents=True, exist_ok=True)
        for path, pixels in zip(_relative_paths(table), table.inputs, strict=True):
            (roots[name] / path).write_bytes(digit_png(pixels))
    renamed = DigitsSplits(
        ExampleTable(_relative_paths(splits.train), splits.train.inputs, splits.train.labels),
        splits.clean_train_labels,
        ExampleTable(_relative_paths(splits.validation), splits.validation.inputs, splits.validation.labels),
        ExampleTable(_relative_paths(splits.production), splits.production.inputs, splits.production.labels),
    )
    return DigitsImageFolders(roots, renamed)


def digits_image_modality(size: tuple[int, int] = IMAGE_SIZE, mode: str = IMAGE_MODE):
    """The `image` modality of the image demo (audit.modalities.image.Image): resize to `size`,
    convert to `mode` ("RGB" for torchvision classifiers, "L" for one channel), normalise with
    IMAGE_MEAN / IMAGE_STD (first value only for "L")."""
    from audit.modalities.image import Image

    channels = 3 if mode == "RGB" else 1
    return Image(tuple(size), mode, IMAGE_MEAN[:channels], IMAGE_STD[:channels])


def read_image_folder(root: Path, modality=None) -> ExampleTable:
    """An ImageFolder root read as the product reads it (audit.datasets, format `imagefolder`: ids =
    relative paths, labels = sorted class folders) and encoded by `modality` (default
    `digits_image_modality()`): inputs float32 [N, C, H, W]."""
    import pandas as pd

    from audit.datasets import DataSource, iter_frames

    modality = modality or digits_image_modality()
    frames = list(iter_frames(DataSource(str(root), format="imagefolder")))
    return modality.table(pd.concat(frames, ignore_index=True))


def build_torchvision(builder: str = TORCHVISION_BUILDER, kwargs: dict[str, Any] | None = None,
                      seed: int = 0) -> nn.Module:
    """`torchvision.models.get_model(builder, **kwargs)` (default TORCHVISION_KWARGS) with initial
    weights drawn under `seed`; never downloads (no `weights`). float32, eval mode."""
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.get_model(builder, **(TORCHVISION_KWARGS if kwargs is None else kwargs)).eval()


@dataclass(frozen=True)
class ImageTrainConfig:
    """Training recipe of the image demo's torchvision model: AdamW, cosine schedule, seeded."""

    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3  # 93.1% validation accuracy with resnet18 at 32 x 32 (see TORCHVISION_BUILDER)
    weight_decay: float = 5e-4
    seed: int = 0

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, seed=self.seed)


def train_image_model(model: nn.Module, table: ExampleTable,
                      config: ImageTrainConfig = ImageTrainConfig()) -> list[float]:
    """Train `model` IN PLACE on `table` (inputs as the modality encodes them, [N, C, H, W]) with
    `audit.training.train`; returns the mean training loss per epoch; the model ends in eval mode."""
    return train(model, table.dataset(), config.train_config())
