"""The gradient index (audit.influence.index) against the unprojected engine EK-FAC: ranking
quality, label-noise detection and cost, side by side in one process (issue 13).

    .venv/bin/python bench/index_quality.py                                  # both parts, ~30 min
    .venv/bin/python bench/index_quality.py --parts digits --ranks 8 16 32
    .venv/bin/python bench/index_quality.py --parts sst2 --n-train 1000 --write /tmp/index_quality.md

Parts (each model trained once; the index at every rank and the reference scored on the same
model, data and queries):
  digits  SmallResNet on digits with 10% flipped labels, trained as bench/influence.py part c
          (TrainConfig()); queries = the misclassified validation examples (reviewer label = true
          label). Reference: `influence_scores(method="ekfac")` over all parameters (its GroupNorm
          parameters get EK-FAC's exact diagonal; the index covers the Conv2d/Linear layers only),
          and the same reference over the Conv2d/Linear weights only, which isolates what the
          projection gives up. Index ranks 8, 16, 32 (fisher_samples=1), rank 16 with exact
          Fisher (fisher_samples=None), and an unprojected index (ranks above every layer size).
  sst2    all-MiniLM-L6-v2 fine-tuned on `--n-train` SST-2 phrases (10% flipped labels) with the
          demo's recipe (audit.demo.text_models: max_length 64, lr 3e-4, 2 epochs, batch 32, top 2
          encoder layers + pooler + classifier trainable); queries = `--queries` validation
          sentences the model gets wrong (then right ones if too few). The index, the reference and
          the epoch cover a seeded `--n-scored` of the training phrases: the reference, engine
          EK-FAC with param_filter = the trainable prefixes (its LayerNorm parameters get the
          exact diagonal; the index covers the Linear layers only), costs ~1-4 s per training
          phrase and per query on this CPU (per-example eigenbasis rotations of 1536 x 385 and
          384 x 1537 weights), so N = 1,000 is out of reach of a 10-minute reference.
Metrics per index: top-10 overlap with the reference (mean over queries of |top10 ∩ top10_ref| / 10,
proponents and opponents separately), mean per-query Spearman over all training examples,
self-influence ROC AUC for the flipped labels (the reference's on the same row), build seconds
and build / one training epoch (the epoch timed in this process on a copy of the model: same
trainable parameters, optimizer and batch size as the model's training; text batches trimmed of
trailing padding, as fine_tune_text does; both warmed up first), seconds to score the queries
(`index.top(k=10)`, streamed) and the reference's seconds (scores + self-influence). The index's
code path is warmed up on 64 examples before the first timed build.

Timed with `--threads` intra-op threads (default 1: on the shared 2-core machine two threads
ran MiniLM steps 2-3x slower than one). Run timed runs under `flock /tmp/bench.lock`.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch.utils.data import Dataset, Subset, TensorDataset

from audit.influence import influence_scores, self_influence, top_influences
from audit.influence.index import IndexConfig, build_index
from audit.training import TrainConfig, predict_logits, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
K = 10
MAX_LENGTH = 64  # the demo recipe's
UNPROJECTED = 4096  # a rank above every layer's sizes: the index keeps each side exact


@dataclass(frozen=True)
class Case:
    """A trained model with its data: `train` and `queries` map-style datasets, `flipped` bool [N]."""

    name: str
    model: torch.nn.Module
    train: Dataset
    queries: Dataset
    flipped: np.ndarray
    epoch: float  # seconds of one training epoch, measured in this process
    note: str
    repeats: int = 1  # timings: the fastest of this many runs
    time_epoch: Callable[[], float] | None = None  # one more epoch, timed: interleaved with the builds


@dataclass(frozen=True)
class Reference:
    """Unprojected engine EK-FAC: scores [Q, N], self-influence [N] (or None), seconds of each."""

    label: str
    scores: torch.Tensor
    own: torch.Tensor | None
    seconds: float  # scores: curvature fit, queries, training gradients
    self_seconds: float  # self-influence with the fitted curvature (NaN when not computed)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def overlap(scores: torch.Tensor, reference: torch.Tensor, k: int = K) -> tuple[float, float]:
    """Mean over queries of |top-k ∩ reference top-k| / k for proponents and for opponents."""
    a, b = top_influences(scores, k), top_influences(reference, k)

    def mean(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(np.mean([len(set(r.tolist()) & set(s.tolist())) / k for r, s in zip(x, y, strict=True)]))

    return mean(a.proponents, b.proponents), mean(a.opponents, b.opponents)


def mean_spearman(scores: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over queries of the Spearman correlation across all training examples."""
    return float(np.mean([spearmanr(s.numpy(), r.numpy())[0] for s, r in zip(scores, reference, strict=True)]))


def reference(case: Case, label: str, param_filter=None, own: bool = True) -> Reference:
    """Engine EK-FAC on `case`: scores, then (`own`) self-influence reusing the fitted curvature."""
    with tempfile.TemporaryDirectory() as cache:
        options = dict(method="ekfac", param_filter=param_filter, progress=False, cache_dir=cache)
        scores, seconds = timed(lambda: influence_scores(case.model, case.train, case.queries, **options))
        self_scores, self_seconds = timed(lambda: self_influence(case.model, case.train, **options)) if own else (
            None, float("nan"))
    print(f"reference {label}: scores {seconds:.1f} s, self-influence {self_seconds:.1f} s", flush=True)
    return Reference(label, scores.float(), None if self_scores is None else self_scores.float(), seconds,
                     self_seconds)


def warm_up_index(case: Case) -> None:
    """One small build first: the first batched backward pass loads torch.func's machinery."""
    with tempfile.TemporaryDirectory() as root:
        warm = Subset(case.train, range(min(64, len(case.train))))
        build_index(case.model, warm, root, IndexConfig(), progress=False)


def index_row(case: Case, name: str, config: IndexConfig, refs: list[Reference], repeats: int | None = None
              ) -> list[object]:
    """Build the index (a fresh folder per repeat), time `top`, compare its scores with every
    reference. Times: the fastest of `repeats` (default `case.repeats`)."""
    repeats = repeats or case.repeats
    epochs = [case.epoch]
    with tempfile.TemporaryDirectory() as root:
        builds = []
        for r in range(repeats):  # an epoch before each build when the case can time one: the same machine state
            if case.time_epoch is not None:
                epochs.append(case.time_epoch())
            builds.append(timed(lambda r=r: build_index(case.model, case.train, f"{root}/{r}", config,
                                                        progress=False)))
        index, build = builds[-1][0], min(seconds for _, seconds in builds)
        query = min(timed(lambda: index.top(case.model, case.queries, k=K))[1] for _ in range(repeats))
        scores, own = index.scores(case.model, case.queries), index.self_influence()
    row: list[object] = [name, index.dim]
    for ref in refs:
        row += [*overlap(scores, ref.scores), mean_spearman(scores, ref.scores)]
    auc = roc_auc_score(case.flipped, own.numpy())
    return [*row, auc, build, build / min(epochs), query]


def reference_row(case: Case, ref: Reference, refs: list[Reference]) -> list[object]:
    row: list[object] = [f"engine EK-FAC, {ref.label}", "-"]
    for other in refs:
        row += [*overlap(ref.scores, other.scores), mean_spearman(ref.scores, other.scores)]
    auc = roc_auc_score(case.flipped, ref.own.numpy()) if ref.own is not None else "-"
    return [*row, auc, f"{ref.seconds:.1f} + self {ref.self_seconds:.1f}", ref.seconds / case.epoch, "-"]


def one_epoch(config: TrainConfig) -> TrainConfig:
    """`config` for a single epoch."""
    return TrainConfig(epochs=1, batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay,
                       seed=config.seed)


def epoch_seconds(model: torch.nn.Module, data: Dataset, config: TrainConfig, warm: Dataset, repeats: int = 1
                  ) -> float:
    """Seconds of one epoch of `train` on a copy of `model` (its trainable parameters), after a
    warm-up epoch on the small `warm` set on another copy; the fastest of `repeats`."""
    one = one_epoch(config)
    train(copy.deepcopy(model), warm, one)
    return min(timed(lambda: train(copy.deepcopy(model), data, one))[1] for _ in range(repeats))


# ----------------------------------------------------------------------------- digits
def digits_case(repeats: int) -> Case:
    from audit.demo.digits import load_digits_splits
    from audit.demo.models import SmallResNet

    splits = load_digits_splits(noise_rate=0.1, seed=0)
    torch.manual_seed(0)
    model = SmallResNet()
    config = TrainConfig()
    data = splits.train.dataset()
    train(model, data, config)
    pred = predict_logits(model, splits.validation.inputs).argmax(1)
    wrong = (pred != splits.validation.labels).nonzero().squeeze(1).tolist()
    epoch = epoch_seconds(model, data, config, splits.train.subset(list(range(256))).dataset(), repeats)
    one = one_epoch(config)
    note = (f"SmallResNet on digits, 10% flipped labels (N={len(splits.train)}, {len(wrong)} misclassified "
            f"validation examples as queries, one training epoch {epoch:.3f} s at batch {config.batch_size}; "
            f"times: fastest of {repeats}; build / one epoch: against the fastest epoch, one timed before "
            "each build)")
    return Case("digits", model, data, splits.validation.subset(wrong).dataset(), splits.flipped.numpy(), epoch,
                note, repeats, lambda: timed(lambda: train(copy.deepcopy(model), data, one))[1])


def weights_only(name: str, param: torch.nn.Parameter) -> bool:
    """Conv2d/Linear parameters of SmallResNet (GroupNorm's are 1-D and have 'norm' in their name)."""
    return "norm" not in name and not name.startswith("stem.1")


def digits_part(ranks: list[int], repeats: int) -> tuple[str, list[str], list[list[object]]]:
    case = digits_case(repeats)
    warm_up_index(case)
    refs = [reference(case, "all parameters"), reference(case, "Conv2d/Linear only", weights_only)]
    configs = [(f"index rank {r}", IndexConfig(rank_in=r, rank_out=r)) for r in ranks]
    if 16 in ranks:
        configs.append(("index rank 16, exact Fisher", IndexConfig(fisher_samples=None)))
        configs.append(("index rank 16, batch 64 (the fixed default before session 13)", IndexConfig(batch_size=64)))
    rows = [index_row(case, name, cfg, refs) for name, cfg in configs]
    unprojected = IndexConfig(rank_in=UNPROJECTED, rank_out=UNPROJECTED, fisher_samples=None)
    rows.append(index_row(case, "index unprojected (timed once)", unprojected, refs, repeats=1))
    rows += [reference_row(case, ref, refs) for ref in refs]
    return case.note, header([r.label for r in refs]), rows


# ----------------------------------------------------------------------------- sst2
def sst2_case(n_train: int, n_scored: int, n_queries: int, n_validation: int) -> tuple[Case, tuple[str, ...]]:
    """MiniLM fine-tuned on `n_train` phrases; the index, the reference and the epoch all cover the
    same seeded `n_scored` of them (all when n_scored >= n_train)."""
    from audit.demo.sst2 import sample_sst2_splits
    from audit.demo.text_models import (
        TextTrainConfig,
        TrimPadding,
        encode_texts,
        fine_tune_text,
        minilm_classifier,
        top_prefixes,
    )

    splits = sample_sst2_splits(DATA, n_train=n_train, n_validation=n_validation, n_production=1, noise_rate=0.1,
                                seed=0)
    model, tokenizer = minilm_classifier(num_labels=2, seed=0)
    ids = encode_texts(tokenizer, splits.train["text"], MAX_LENGTH)
    labels = torch.tensor(splits.train["label"].to_numpy(), dtype=torch.int64)
    recipe = TextTrainConfig()
    (classifier, _), fine_tune = timed(lambda: fine_tune_text(model, tokenizer, ids, labels, recipe))
    val_ids = encode_texts(tokenizer, splits.validation["text"], MAX_LENGTH)
    val_labels = torch.tensor(splits.validation["label"].to_numpy(), dtype=torch.int64)
    right = predict_logits(classifier, val_ids).argmax(1) == val_labels
    chosen = torch.cat([(~right).nonzero().flatten(), right.nonzero().flatten()])[:n_queries]
    scored = torch.as_tensor(np.sort(np.random.default_rng(0).permutation(n_train)[:n_scored]))
    data = TensorDataset(ids[scored], labels[scored])
    flipped = splits.flipped[scored.numpy()]
    warm = TensorDataset(ids[:64], labels[:64])
    epoch = epoch_seconds(TrimPadding(classifier), data, recipe.train_config(), warm)
    prefixes = top_prefixes(classifier, recipe.trainable_layers)
    note = (f"MiniLM fine-tuned on {n_train} SST-2 phrases with 10% flipped labels ({recipe.epochs} epochs, "
            f"{fine_tune:.0f} s; validation accuracy {float(right.float().mean()):.3f} on {len(right)}); trainable "
            f"and scored: {', '.join(prefixes)}; N = {len(scored)} of the training phrases scored "
            f"({int(flipped.sum())} flipped); {len(chosen)} queries, {int((~right[chosen]).sum())} of them "
            f"misclassified; one training epoch on the N: {epoch:.1f} s (batch {recipe.batch_size}, shuffled, "
            "trailing padding trimmed per batch as fine_tune_text does)")
    queries = TensorDataset(val_ids[chosen], val_labels[chosen])
    return Case("sst2", classifier, data, queries, flipped, epoch, note), prefixes


def sst2_part(ranks: list[int], n_train: int, n_scored: int, n_queries: int, n_validation: int,
              reference_self: bool, linear_reference: bool) -> tuple[str, list[str], list[list[object]]]:
    case, prefixes = sst2_case(n_train, n_scored, n_queries, n_validation)
    warm_up_index(case)
    refs = [reference(case, "trainable prefixes", list(prefixes), own=reference_self)]
    if linear_reference:  # what the index covers: the Linear layers of those prefixes, no LayerNorm
        def linear(name: str, param: torch.nn.Parameter) -> bool:
            return name.startswith(prefixes) and "LayerNorm" not in name

        refs.append(reference(case, "their Linear layers only", linear, own=False))
    rows = [index_row(case, f"index rank {r}", IndexConfig(rank_in=r, rank_out=r), refs) for r in ranks]
    rows += [reference_row(case, ref, refs) for ref in refs]
    return case.note, header([ref.label for ref in refs]), rows


# ----------------------------------------------------------------------------- output
def header(labels: list[str]) -> list[str]:
    cols = ["scores", "row dim"]
    for label in labels:
        cols += [f"top-10 proponents vs {label}", f"top-10 opponents vs {label}", f"Spearman vs {label}"]
    return [*cols, "self-influence AUC (flipped)", "build s (reference: scoring s)", "/ one epoch",
            f"top-{K} of the queries s"]


def markdown(title: str, cols: list[str], rows: list[list[object]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["digits", "sst2"], choices=["digits", "sst2"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--n-train", type=int, default=1000, help="SST-2 phrases MiniLM is fine-tuned on")
    parser.add_argument("--n-scored", type=int, default=200,
                        help="of those, how many the index, the reference and the epoch cover (seeded sample)")
    parser.add_argument("--no-reference-self", action="store_true", help="skip the engine's self-influence")
    parser.add_argument("--linear-reference", action="store_true",
                        help="sst2: also engine EK-FAC over the Linear layers only (what the index covers)")
    parser.add_argument("--queries", type=int, default=100, help="SST-2 queries")
    parser.add_argument("--n-validation", type=int, default=872, help="SST-2 validation sentences to pick from")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="digits: timings are the fastest of this many")
    parser.add_argument("--write", type=Path, help="append the tables (markdown) to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    intro = (f"torch {torch.__version__}, {args.threads} intra-op thread(s), {platform.processor() or 'cpu'} "
             f"x{os.cpu_count()}, load average at start {os.getloadavg()[0]:.1f}")
    print(intro, flush=True)
    out = [f"## bench/index_quality.py ({intro})\n"]
    for part in args.parts:
        if part == "digits":
            note, cols, rows = digits_part(args.ranks, args.repeats)
        else:
            note, cols, rows = sst2_part(args.ranks, args.n_train, args.n_scored, args.queries, args.n_validation,
                                          not args.no_reference_self, args.linear_reference)
        out.append(markdown(f"{part}: {note}", cols, rows))
        print(out[-1], flush=True)
    if args.write:
        with args.write.open("a", encoding="utf-8") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
