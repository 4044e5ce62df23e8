"""`model-audit demo --task images`: the digits demo on image files and a torchvision
architecture. scikit-learn's digits (noisy training labels) are written as PNG files in
torchvision's ImageFolder layout under `<workdir>/data/digits-images/`, read back through the
product's image-folder reader and `image` modality (so the model trains on exactly what the audit
will read), a `torchvision.models.get_model(builder, num_classes=10)` is trained on them and
registered as kind `torchvision` with its data recorded by reference (nothing copied), the
production images it gets wrong go to the inbox as a flagged batch of PNG bytes, and the same
`audit` and `correct` flows run on them.

It also measures what an audit costs next to training, for this kind: seconds per training epoch
and seconds of the whole audit flow, both on the demo's pinned thread count, and their ratio.
"""

from __future__ import annotations

import filecmp
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch

from audit.demo.digits import NUM_CLASSES, load_digits_splits
from audit.demo.image_folder import (
    SPLITS,
    DigitsImageFolders,
    ImageTrainConfig,
    build_torchvision,
    digits_image_modality,
    read_image_folder,
    train_image_model,
    write_digits_image_folders,
)
from audit.errors import InvalidInput
from audit.flagged import write_batch
from audit.training import accuracy, predict_logits
from flows.audit_flow import AuditResult, audit
from flows.correct_flow import CorrectionResult, correct
from flows.demo import (
    SPLIT_FRACTIONS,
    TRAIN_THREADS,
    correction_lines,
    cost_line,
    log_cost,
    pinned_threads,
    raise_nothing_flagged,
    start_prefect,
)
from flows.settings import AuditSettings, CorrectionSettings, GateSettings, StoreSettings
from registry_hooks.audit_log import log_metrics, log_training_run, mlflow_run
from registry_hooks.lineage import log_label_noise, log_training_reference
from registry_hooks.model_io import ModelSpec, load_version, log_classifier, resolve_version
from registry_hooks.registry import CHAMPION, register_version
from registry_hooks.store import ui_command, use_store

MODEL_NAME = "digits-images-classifier"
DATA_FOLDER = Path("data") / "digits-images"
# What audits score and repairs fine-tune (ModelSpec.tuned_params): resnet18's classification head.
TUNED_PARAMS = ("fc.",)


@dataclass(frozen=True)
class ImageDemoResult:
    """Everything the image demo's summary prints. `epoch_seconds`: wall-clock seconds per
    training epoch; `audit_seconds`: of the whole `audit` flow (reading and validating the batch,
    loading the model and the image folders, influence, report, logging); both measured with
    time.perf_counter on `threads` intra-op threads."""

    workdir: Path
    data_roots: dict[str, Path]
    builder: str
    image_size: int
    train_run_id: str
    champion_version: str
    n_train: int
    n_flipped: int
    n_production: int
    n_flagged: int
    validation_accuracy: float
    epochs: int
    epoch_seconds: float
    audit_seconds: float
    threads: int
    audit: AuditResult
    correction: CorrectionResult
    relabel_precision: float | None  # of the chosen repair's label edits, from the demo's clean labels

    @property
    def audit_epoch_ratio(self) -> float:
        """Seconds of the audit per second of one training epoch."""
        return self.audit_seconds / self.epoch_seconds


def image_folders(splits, folder: Path) -> DigitsImageFolders:
    """The digits splits as PNG image folders under `folder` (audit.demo.image_folder): written
    when `folder` is empty or absent; reused when it already holds exactly those files (a second
    demo in the same workdir), since the files depend only on the splits; InvalidInput when it
    holds anything else (the recorded digests of earlier runs point at it)."""
    folder = Path(folder)
    if not any((folder / name).exists() for name in SPLITS):
        return write_digits_image_folders(splits, folder)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        fresh = write_digits_image_folders(splits, Path(tmp))
        for name in SPLITS:
            if not _same_tree(fresh.roots[name], folder / name):
                raise InvalidInput(f"{folder / name} holds other files than this demo's {name} pictures; "
                                   "run the demo in another workdir.")
    return DigitsImageFolders({name: folder / name for name in SPLITS}, fresh.splits)


def _same_tree(expected: Path, found: Path) -> bool:
    files = sorted(p.relative_to(expected) for p in expected.rglob("*") if p.is_file())
    present = sorted(p.relative_to(found) for p in found.rglob("*") if p.is_file()) if found.is_dir() else []
    return files == present and all(filecmp.cmp(expected / p, found / p, shallow=False) for p in files)


def flagged_image_frame(production: pd.DataFrame, predicted: torch.Tensor, source: str = "") -> pd.DataFrame:
    """The flagged batch of an image model: the rows of `production` (as the image-folder reader
    gives them: `example_id`, `label`, `image` bytes) whose prediction in `predicted` [N] is
    wrong, with `true_label` (the folder's label, the reviewer's), `predicted_label`,
    `flagged_at` and `source`."""
    labels = torch.tensor(production["label"].to_numpy(dtype="int64"))
    wrong = (predicted != labels).numpy()
    frame = production.loc[wrong, ["example_id", "image"]].reset_index(drop=True)
    return frame.assign(predicted_label=predicted.numpy()[wrong].astype("int64"),
                        true_label=labels.numpy()[wrong].astype("int64"),
                        flagged_at=pd.Timestamp.now(tz="UTC"), source=source)


def _production_frame(root: Path) -> pd.DataFrame:
    from audit.datasets import DataSource, iter_frames

    return pd.concat(list(iter_frames(DataSource(str(root), format="imagefolder"))), ignore_index=True)


def run_image_demo(workdir: Path, *, seed: int = 0, epochs: int = 15, method: str = "ekfac",
                   min_fix_rate: float = 0.5, progress: bool = False, builder: str = "resnet18",
                   image_size: int = 32, noise_rate: float = 0.1,
                   candidates: tuple[str, ...] | None = None) -> ImageDemoResult:
    """The whole image demo (module docstring); each call registers a new champion of
    `digits-images-classifier` first. `builder`: a torchvision classification builder (its
    parameters whose names start with "fc." are the ones audits score and repairs tune, so it
    must have an `fc` head, as the ResNets do); `image_size`: the square side the modality
    resizes the 8 x 8 digits to; `progress`: progress bars of the influence passes on stderr;
    `candidates`: the correction's repair candidates by name (CorrectionSettings; None: its defaults).
    InvalidInput before anything is trained when a setting is unusable."""
    workdir = Path(workdir).resolve()
    # Settings are validated before anything is written, trained or registered. The torchvision
    # kind loads without unpickling, so the store needs no pickle opt-in.
    store = StoreSettings(workdir=workdir)
    audit_settings = AuditSettings(model_name=MODEL_NAME, alias=CHAMPION, method=method, progress=progress)
    chosen = {} if candidates is None else {"candidates": tuple(candidates)}
    correction_settings = CorrectionSettings(gates=GateSettings(min_fix_rate=min_fix_rate), progress=progress,
                                             **chosen)
    if epochs < 1:
        raise InvalidInput(f"The image demo trains for at least 1 epoch; got {epochs}.")
    modality = digits_image_modality(size=(image_size, image_size))
    kwargs = {"num_classes": NUM_CLASSES}
    from registry_hooks.model_kinds.torchvision import TorchvisionModel

    spec = ModelSpec(modality.input_shape(), NUM_CLASSES, kind=TorchvisionModel(builder, kwargs), modality=modality,
                     tuned_params=TUNED_PARAMS)
    spec.tuned_names(spec.kind.build())  # a builder without an `fc` head is refused here, not after training

    workdir.mkdir(parents=True, exist_ok=True)
    use_store(workdir)
    splits = load_digits_splits(noise_rate=noise_rate, seed=seed, fractions=SPLIT_FRACTIONS)
    folders = image_folders(splits, workdir / DATA_FOLDER / f"seed{seed}-noise{noise_rate:g}")
    # The model trains on the folders as the audit will read them back (reader + modality).
    train, validation = (read_image_folder(folders.roots[s], modality) for s in ("train", "validation"))

    config = ImageTrainConfig(epochs=epochs, seed=seed)
    with pinned_threads(TRAIN_THREADS):
        model = build_torchvision(builder, kwargs, seed=seed)
        started = time.perf_counter()
        losses = train_image_model(model, train, config)
        epoch_seconds = (time.perf_counter() - started) / epochs
    validation_accuracy = accuracy(model, validation.inputs, validation.labels)

    with mlflow_run(f"train {MODEL_NAME}") as train_run_id:
        log_training_run({"noise_rate": noise_rate,  # the modality records image_size
                          **{f"train.{k}": v for k, v in vars(config).items()}}, losses, {
            "train_accuracy": accuracy(model, train.inputs, train.labels),
            "validation_accuracy": validation_accuracy,
            "n_flipped_labels": int(folders.splits.flipped.sum()),
            "train_epoch_seconds": epoch_seconds,
        })
        log_training_reference(train=folders.roots["train"], validation=folders.roots["validation"],
                               format="imagefolder")
        renamed = folders.splits
        log_label_noise(renamed.train.ids, renamed.clean_train_labels.tolist(), renamed.train.labels.tolist())
        uri = log_classifier(model, spec)
    version = register_version(uri, MODEL_NAME, CHAMPION)

    # Production: the registered champion (loaded back, no pickle) predicts the production images.
    production = _production_frame(folders.roots["production"])
    loaded = load_version(resolve_version(MODEL_NAME, version=version), allow_pickle=False)
    predicted = predict_logits(loaded.model, loaded.spec.table(production).inputs).argmax(1)
    flagged = flagged_image_frame(production, predicted, source="demo-production")
    if flagged.empty:
        raise_nothing_flagged(MODEL_NAME, version, len(production))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    write_batch(flagged, workdir / "inbox" / f"flagged-{stamp}.parquet")

    start_prefect()
    with pinned_threads(TRAIN_THREADS):  # the same threads as an epoch, so the ratio compares like with like
        started = time.perf_counter()
        audit_result = audit(store, audit_settings)
        audit_seconds = time.perf_counter() - started
    log_cost(audit_result.run_id, epoch_seconds, audit_seconds)
    # Pinned too: on a loaded 2-core machine, two intra-op threads made each of the correction's small
    # fine-tuning steps of resnet18 (3 pictures) take 1.1 s instead of 45 ms with one (measured).
    with pinned_threads(TRAIN_THREADS):
        correction = correct(store, correction_settings, audit_result.run_id)
    chosen = correction.search.chosen
    precision = renamed.relabel_precision(chosen.repair.relabels if chosen else {})
    if precision is not None:  # the demo alone knows which labels it flipped
        log_metrics(correction.run_id, {"relabel_precision": precision})
    return ImageDemoResult(workdir, dict(folders.roots), builder, image_size, train_run_id, version, len(train),
                           int(renamed.flipped.sum()), len(production), len(flagged), validation_accuracy, epochs,
                           epoch_seconds, audit_seconds, TRAIN_THREADS, audit_result, correction, precision)


def summary(result: ImageDemoResult) -> str:
    """The human-readable summary the CLI prints."""
    shape = f"{result.image_size}x{result.image_size}"
    lines = [
        f"Wrote the digits as PNG files (ImageFolder layout) under {result.data_roots['train'].parent}.",
        f"Trained torchvision {result.builder} on {result.n_train} {shape} pictures ({result.n_flipped} in the wrong "
        f"class folder), validation accuracy {result.validation_accuracy:.2%}; registered version "
        f"{result.champion_version} of {MODEL_NAME} as @champion (run {result.train_run_id}), its data by reference.",
        f"Production: {result.n_flagged} of {result.n_production} predictions wrong -> flagged batch in the inbox.",
        f"Audit run {result.audit.run_id}: {result.audit.n_flagged} flagged x {result.audit.n_train} training "
        f"pictures scored, {result.audit.n_candidates} correction candidates.",
        cost_line(result.epoch_seconds, result.audit_seconds, result.threads, result.threads),
    ]
    lines += correction_lines(result.correction, result.relabel_precision)
    lines.append(f"Open the MLflow UI: {ui_command(result.workdir)}")
    return "\n".join(lines)
