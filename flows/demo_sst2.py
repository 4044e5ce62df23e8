"""`model-audit demo --task sst2 --data DIR`: the text demo. Fine-tunes all-MiniLM-L6-v2 on a
seeded SST-2 sample with injected label noise, registers it as a `transformers` model whose
training data is recorded by reference (Parquet folders under `<workdir>/data/sst2/`, nothing
copied into MLflow), drops its production mispredictions into the inbox as a `text` flagged
batch, then runs the same `audit` and `correct` flows as the digits demo (flows/demo.py).

The audit and the repair score and fine-tune only the pooler and the classifier
(`ModelSpec.tuned_params`); training fine-tunes the top `trainable_layers` encoder layers too.
The summary reports the audit's seconds next to the seconds of one training epoch on the same
data (the issue's "measured side by side"), both timed here with `time.perf_counter`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch

from audit.demo.sst2 import NUM_CLASSES, TextSplits, sample_sst2_splits
from audit.demo.text_models import TextTrainConfig, encode_texts, fine_tune_text, minilm_classifier, top_prefixes
from audit.flagged import write_batch
from audit.training import accuracy, predict_logits
from flows.audit_flow import AuditResult, audit
from flows.correct_flow import CorrectionResult, correct
from flows.demo import (
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
from registry_hooks.model_io import ModelSpec, log_classifier
from registry_hooks.registry import CHAMPION, register_version
from registry_hooks.store import ui_command, use_store

MODEL_NAME = "sst2-classifier"
# Sizes measured by helper D1 (audit/demo/text_models.py docstring) and cut so that the whole demo
# stays within minutes on a 2-core CPU: MiniLM's tokens rarely exceed 56 for these sentences.
N_TRAIN, N_VALIDATION, N_PRODUCTION = 1500, 400, 400
NOISE_RATE = 0.1
EPOCHS = 2
MAX_LENGTH = 56
TRAINABLE_LAYERS = 2
METHOD = "auto"
MIN_FIX_RATE = 0.5
# What the audit scores and a repair fine-tunes: the pooler and the classifier (top_prefixes(model, 0)).
TUNED_LAYERS = 0

ModelFactory = Callable[..., tuple[torch.nn.Module, object]]  # (num_labels=, seed=) -> (HF model, tokenizer)


@dataclass(frozen=True)
class TextDemoResult:
    """Everything the text demo's summary prints; times in seconds (wall clock)."""

    workdir: Path
    data_folders: dict[str, Path]  # split -> its Parquet folder (train and validation recorded by reference)
    train_run_id: str
    champion_version: str
    n_train: int
    n_flipped: int
    n_production: int
    n_flagged: int
    validation_accuracy: float
    audit: AuditResult
    correction: CorrectionResult
    relabel_precision: float | None  # of the chosen repair's label edits, from the sample's clean labels
    epochs: int
    train_seconds: float  # all epochs of fine-tuning
    audit_seconds: float  # the `audit` flow, start to end
    correction_seconds: float  # the `correct` flow, start to end
    threads: int  # intra-op threads of training, the audit and the correction

    @property
    def epoch_seconds(self) -> float:
        """Mean seconds of one training epoch."""
        return self.train_seconds / self.epochs


def sample_key(n_train: int, n_validation: int, n_production: int, noise_rate: float, seed: int) -> str:
    """The folder name of one sample under `<workdir>/data/sst2/`: another sample gets another
    folder, so the references recorded by earlier versions stay valid."""
    return f"seed{seed}-noise{noise_rate:g}-n{n_train}-{n_validation}-{n_production}"


def train_and_register(splits: TextSplits, folders: dict[str, Path], model_factory: ModelFactory,
                       config: TextTrainConfig, max_length: int, noise_rate: float) -> tuple[str, str, float, float]:
    """Fine-tune `model_factory(num_labels=2, seed=config.seed)` on the noisy training split (with
    the caller's thread count), log the run with its data by reference (`folders["train"]`,
    `folders["validation"]`), the label noise and the model as kind `transformers`, and register
    it as champion. Returns (run id, version, validation accuracy, training seconds)."""
    model, tokenizer = model_factory(num_labels=NUM_CLASSES, seed=config.seed)
    train_ids = encode_texts(tokenizer, splits.train["text"], max_length)
    train_labels = torch.tensor(splits.train["label"].to_numpy(), dtype=torch.int64)
    start = time.perf_counter()
    classifier, losses = fine_tune_text(model, tokenizer, train_ids, train_labels, config)
    seconds = time.perf_counter() - start
    validation_ids = encode_texts(tokenizer, splits.validation["text"], max_length)
    validation_labels = torch.tensor(splits.validation["label"].to_numpy(), dtype=torch.int64)
    metrics = {
        "train_accuracy": accuracy(classifier, train_ids, train_labels),
        "validation_accuracy": accuracy(classifier, validation_ids, validation_labels),
        "n_flipped_labels": int(splits.flipped.sum()),
        "train_seconds": seconds,
        "epoch_seconds": seconds / config.epochs,
    }
    from registry_hooks.model_kinds.transformers import TransformersModel

    spec = ModelSpec((max_length,), NUM_CLASSES, kind=TransformersModel(tokenizer=tokenizer),
                     tuned_params=top_prefixes(classifier, TUNED_LAYERS))
    with mlflow_run(f"train {MODEL_NAME}") as run_id:
        params = {"noise_rate": noise_rate, "max_length": max_length,
                  **{f"train.{k}": v for k, v in vars(config).items()}}
        log_training_run(params, losses, metrics)
        log_training_reference(folders["train"], folders["validation"], "parquet", inputs=("text",))
        log_label_noise(tuple(splits.train["example_id"]), splits.clean_train_labels.tolist(),
                        splits.train["label"].tolist())
        uri = log_classifier(classifier, spec)
    return run_id, register_version(uri, MODEL_NAME, CHAMPION), metrics["validation_accuracy"], seconds


def flagged_text_frame(production: pd.DataFrame, predicted: torch.Tensor, source: str = "") -> pd.DataFrame:
    """A `text` flagged batch: `example_id`, `text`, `predicted_label` (the model's), `true_label`
    (the reviewer's: `production`'s label), `flagged_at`, `source`; one row per row of `production`."""
    return pd.DataFrame({
        "example_id": production["example_id"].astype(str).to_numpy(),
        "text": production["text"].astype(str).to_numpy(),
        "predicted_label": predicted.numpy().astype("int64"),
        "true_label": production["label"].to_numpy(dtype="int64"),
    }).assign(flagged_at=pd.Timestamp.now(tz="UTC"), source=source)


def simulate_production(model_version: str, production: pd.DataFrame, inbox: Path) -> tuple[int, int]:
    """Predict the production sentences with the registered champion (as the registry gives it
    back: the logged model and tokenizer) and drop its mispredictions (reviewer label = true label)
    into the inbox as a `text` batch. Returns (production size, flagged count)."""
    from registry_hooks.model_io import load_version, resolve_version

    loaded = load_version(resolve_version(MODEL_NAME, version=model_version), allow_pickle=False)
    table = loaded.spec.table(production)
    predicted = predict_logits(loaded.model, table.inputs).argmax(1)
    wrong = (predicted != table.labels).nonzero().flatten().tolist()
    if not wrong:
        raise_nothing_flagged(MODEL_NAME, model_version, len(production))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    frame = flagged_text_frame(production.iloc[wrong], predicted[wrong], source="demo-production")
    write_batch(frame, inbox / f"flagged-{stamp}.parquet")
    return len(production), len(wrong)


def run_sst2_demo(
    workdir: Path, data_dir: Path, *, n_train: int = N_TRAIN, n_validation: int = N_VALIDATION,
    n_production: int = N_PRODUCTION, noise_rate: float = NOISE_RATE, seed: int = 0, epochs: int = EPOCHS,
    max_length: int = MAX_LENGTH, trainable_layers: int = TRAINABLE_LAYERS, lr: float = TextTrainConfig.lr,
    method: str = METHOD, min_fix_rate: float = MIN_FIX_RATE, model_factory: ModelFactory = minilm_classifier,
    threads: int = TRAIN_THREADS, progress: bool = False,
) -> TextDemoResult:
    """The whole text demo (module docstring) on the SST-2 folder `data_dir` (audit.demo.sst2).
    `model_factory(num_labels=, seed=)` gives (transformers sequence classifier, tokenizer): MiniLM
    by default, a tiny random-init BERT in the tests; `lr` its fine-tuning learning rate. Training,
    the audit and the correction all run with `threads` intra-op threads, so that their times
    compare (and the flagged batch is reproducible: thread counts change the trained weights); on
    a busy 2-core machine one thread is also the fastest (small ops on two contended threads
    measured 50x slower). Each call registers a new champion first.
    InvalidInput / ValidationError (one sentence) before anything is registered for bad settings,
    a bad SST-2 folder or a missing model package."""
    workdir = Path(workdir).resolve()
    # Settings are validated before anything is trained or registered. Nothing is pickled: no opt-in.
    store = StoreSettings(workdir=workdir)
    audit_settings = AuditSettings(model_name=MODEL_NAME, alias=CHAMPION, method=method, progress=progress)
    correction_settings = CorrectionSettings(gates=GateSettings(min_fix_rate=min_fix_rate), progress=progress)
    config = TextTrainConfig(epochs=epochs, lr=lr, trainable_layers=trainable_layers, seed=seed)
    splits = sample_sst2_splits(data_dir, n_train, n_validation, n_production, noise_rate, seed)
    start_prefect()
    use_store(workdir)
    folders = splits.write(workdir / "data" / "sst2" / sample_key(n_train, n_validation, n_production,
                                                                 noise_rate, seed))
    with pinned_threads(threads):
        run_id, version, validation_accuracy, train_seconds = train_and_register(
            splits, folders, model_factory, config, max_length, noise_rate)
        n_production_seen, n_flagged = simulate_production(version, splits.production, workdir / "inbox")
        start = time.perf_counter()
        audit_result = audit(store, audit_settings)
        audit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        correction = correct(store, correction_settings, audit_result.run_id)
        correction_seconds = time.perf_counter() - start
    chosen = correction.search.chosen
    precision = splits.relabel_precision(chosen.repair.relabels if chosen else {})
    if precision is not None:  # the demo alone knows which labels it flipped
        log_metrics(correction.run_id, {"relabel_precision": precision})
    log_cost(audit_result.run_id, train_seconds / epochs, audit_seconds)
    return TextDemoResult(workdir, folders, run_id, version, len(splits.train), int(splits.flipped.sum()),
                          n_production_seen, n_flagged, validation_accuracy, audit_result, correction, precision,
                          epochs, train_seconds, audit_seconds, correction_seconds, threads)


def summary(result: TextDemoResult) -> str:
    """The human-readable summary the CLI prints."""
    lines = [
        f"Fine-tuned {MODEL_NAME} on {result.n_train} SST-2 sentences ({result.n_flipped} labels flipped; "
        f"validation accuracy {result.validation_accuracy:.1%}); registered version {result.champion_version} "
        f"as @champion (run {result.train_run_id}), its data recorded by reference in "
        f"{result.data_folders['train'].parent}.",
        f"Production: {result.n_flagged} of {result.n_production} predictions wrong -> flagged batch in the inbox.",
        f"Audit run {result.audit.run_id}: {result.audit.n_flagged} flagged x {result.audit.n_train} training "
        f"sentences scored, {result.audit.n_candidates} correction candidates.",
    ]
    lines += correction_lines(result.correction, result.relabel_precision)
    lines.append(cost_line(result.epoch_seconds, result.audit_seconds, result.threads, result.threads))
    lines.append(f"The correction took {result.correction_seconds:.1f} s.")
    lines.append(f"Open the MLflow UI: {ui_command(result.workdir)}")
    return "\n".join(lines)
