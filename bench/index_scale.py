"""How the gradient index (audit.influence.index) scales with the training set: build time against
one training epoch, query time, peak memory and disk, for MiniLM on N SST-2 phrases (issue 13).

    flock /tmp/bench.lock .venv/bin/python bench/index_scale.py --n 1000 5000 --write /tmp/index_scale.md
    nohup flock /tmp/bench.lock .venv/bin/python bench/index_scale.py --n 20000 67349 \\
        --write /tmp/index_scale.md > /tmp/index_scale_big.log 2>&1 &
    .venv/bin/python bench/index_scale.py --n 67349 --ranks 8          # rank 8 at the whole file

Model: all-MiniLM-L6-v2 with a fresh 2-class head (`minilm_classifier(seed=0)`), the top 2 encoder
layers + pooler + classifier trainable (`freeze_bottom(2)`), which is what the index covers (14
Linear layers). Not fine-tuned: the cost does not depend on the weights' values. Data: a seeded
permutation of ../shared/data/sst2/train.tsv (67,349 phrases, labels as given), the first N rows
(N >= 67,349: the whole file); token ids at max_length 64; 100 seeded dev.tsv sentences as the
flagged queries.

Per N and rank, two fresh child processes, so that each phase's peak resident memory
(getrusage ru_maxrss) is its own:
  build  load the model, tokenize the N phrases, warm up (a 64-row index, a 64-row epoch), then
         `build_index` into an empty folder (timed; peak RSS read right after it), then one
         training epoch on the same N phrases (timed): AdamW, batch 32, shuffled, the demo's
         fine-tuning recipe (TextTrainConfig) with trailing padding trimmed per batch as
         fine_tune_text does. The index sorts by length and trims padding per batch; the epoch
         cannot sort (it must shuffle), so its batches keep the padding of their longest phrase.
         Above `--epoch-sample-above` rows the epoch is timed on a seeded `--epoch-sample`-row
         sample of the N and scaled by N / sample (labelled in the table).
  query  load the model, tokenize the N phrases and the 100 flagged ones, open the built index by
         calling `build_index` again (timed; it must reuse every shard: stats.computed == 0), then
         `index.top(model, flagged, k=10)` (timed); peak RSS.
Also the index's size on disk. The issue's targets: build <= 2x one epoch; 100 flagged against
67k in <= 10 s; peak memory growth <= 1.2x from 5k to 67k. Timed with `--threads` intra-op
threads (default 1, as the demo trains: on the shared 2-core machine two threads ran MiniLM steps
2-3x slower). Run under `flock /tmp/bench.lock`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
MAX_LENGTH = 64
N_FLAGGED = 100
TOP_K = 10
MIB = 1024  # ru_maxrss is in KiB on Linux


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def load_model():
    """(TextClassifier, tokenizer): MiniLM, seed 0, top 2 layers + pooler + classifier trainable."""
    from audit.demo.text_models import freeze_bottom, minilm_classifier
    from audit.text_classifier import TextClassifier

    model, tokenizer = minilm_classifier(num_labels=2, seed=0)
    classifier = TextClassifier(model, tokenizer.pad_token_id)
    freeze_bottom(classifier, 2)
    return classifier.eval(), tokenizer


def training_set(tokenizer, n: int) -> TensorDataset:
    """The first n rows of a seeded permutation of train.tsv as (token ids [64], label)."""
    from audit.demo.sst2 import read_sst2_file
    from audit.demo.text_models import encode_texts

    frame = read_sst2_file(DATA / "train.tsv")
    rows = np.random.default_rng(0).permutation(len(frame))[:n]
    ids = encode_texts(tokenizer, frame["text"].iloc[rows], MAX_LENGTH)
    return TensorDataset(ids, torch.tensor(frame["label"].to_numpy()[rows], dtype=torch.int64))


def flagged_set(tokenizer) -> TensorDataset:
    from audit.demo.sst2 import read_sst2_file
    from audit.demo.text_models import encode_texts

    frame = read_sst2_file(DATA / "dev.tsv")
    rows = np.sort(np.random.default_rng(1).permutation(len(frame))[:N_FLAGGED])
    ids = encode_texts(tokenizer, frame["text"].iloc[rows], MAX_LENGTH)
    return TensorDataset(ids, torch.tensor(frame["label"].to_numpy()[rows], dtype=torch.int64))


def one_epoch(classifier, data) -> float:
    """Seconds of one epoch of the demo's fine-tuning recipe on a copy of `classifier`."""
    from audit.demo.text_models import TextTrainConfig, TrimPadding
    from audit.training import TrainConfig, train

    recipe = TextTrainConfig()
    config = TrainConfig(epochs=1, batch_size=recipe.batch_size, lr=recipe.lr, weight_decay=recipe.weight_decay,
                         seed=recipe.seed)
    return timed(lambda: train(TrimPadding(copy.deepcopy(classifier)), data, config))[1]


def index_config(rank: int):
    from audit.influence.index import IndexConfig

    return IndexConfig(rank_in=rank, rank_out=rank)


def build_phase(root: Path, n: int, rank: int, epoch_sample: int, sample_above: int) -> dict:
    """In a fresh child: build the index in `root` (timed, peak RSS), then time one epoch."""
    from audit.influence.index import build_index

    classifier, tokenizer = load_model()
    data, tokenize = timed(lambda: training_set(tokenizer, n))
    warm = Subset(data, range(64))
    with tempfile.TemporaryDirectory() as scratch:
        build_index(classifier, warm, scratch, index_config(rank), progress=False)
    one_epoch(classifier, warm)
    before = peak_mib()
    index, build = timed(lambda: build_index(classifier, data, root, index_config(rank), progress=False))
    after = peak_mib()
    sample = len(data)
    if len(data) > sample_above:
        sample = epoch_sample
        rows = np.sort(np.random.default_rng(2).permutation(len(data))[:sample])
        epoch = one_epoch(classifier, Subset(data, rows.tolist())) * len(data) / sample
    else:
        epoch = one_epoch(classifier, data)
    return {"n": len(data), "rank": rank, "dim": index.dim, "shards": len(index.shards),
            "computed": index.stats.computed, "tokenize_s": tokenize, "build_s": build, "epoch_s": epoch,
            "epoch_rows": sample, "peak_before_build_mib": before, "peak_build_mib": after,
            "disk_mib": folder_mib(root)}


def query_phase(root: Path, n: int, rank: int) -> dict:
    """In a fresh child: reopen the built index (build_index again, nothing computed) and time
    the top-10 of the 100 flagged sentences."""
    from audit.influence.index import build_index

    classifier, tokenizer = load_model()
    data, flagged = training_set(tokenizer, n), flagged_set(tokenizer)
    before = peak_mib()
    index, reopen = timed(lambda: build_index(classifier, data, root, index_config(rank), progress=False))
    if index.stats.computed != 0:
        raise SystemExit(f"reopening the index computed {index.stats.computed} shards; expected 0")
    top, query = timed(lambda: index.top(classifier, flagged, k=TOP_K))
    if tuple(top.proponents.shape) != (N_FLAGGED, TOP_K):
        raise SystemExit(f"top-{TOP_K} of {N_FLAGGED} queries has shape {tuple(top.proponents.shape)}")
    return {"reused": index.stats.reused, "reopen_s": reopen, "query_s": query, "peak_before_open_mib": before,
            "peak_query_mib": peak_mib()}


def folder_mib(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20


def child(args: list[str]) -> dict:
    """Run this script's `--child` in a fresh process; its JSON result (last stdout line)."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


COLUMNS = ["N", "rank", "row dim", "shards", "build s", "one epoch s", "build / epoch", "reopen s",
           f"top-{TOP_K} of {N_FLAGGED} flagged s", "peak RSS build MiB (before build)", "peak RSS query MiB",
           "index on disk MiB"]


def table_row(b: dict, q: dict) -> str:
    epoch = f"{b['epoch_s']:.0f}" if b["epoch_rows"] == b["n"] else (
        f"{b['epoch_s']:.0f} (timed on {b['epoch_rows']:,} rows x {b['n'] / b['epoch_rows']:.2f})")
    cells = [f"{b['n']:,}", b["rank"], b["dim"], b["shards"], f"{b['build_s']:.1f}", epoch,
             f"{b['build_s'] / b['epoch_s']:.2f}", f"{q['reopen_s']:.1f}", f"{q['query_s']:.2f}",
             f"{b['peak_build_mib']:.0f} ({b['peak_before_build_mib']:.0f})", f"{q['peak_query_mib']:.0f}",
             f"{b['disk_mib']:.0f}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 5000, 20000, 67349],
                        help="training-set sizes (>= 67,349: the whole train.tsv)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16])
    parser.add_argument("--epoch-sample", type=int, default=5000)
    parser.add_argument("--epoch-sample-above", type=int, default=20000,
                        help="time the epoch on --epoch-sample rows (scaled linearly) above this N")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "index_scale")
    parser.add_argument("--keep", action="store_true", help="keep the built indexes")
    parser.add_argument("--write", type=Path, help="append the table (markdown) to this file")
    parser.add_argument("--child", nargs=3, metavar=("PHASE", "ROOT", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        phase, root, n = args.child[0], Path(args.child[1]), int(args.child[2])
        result = (build_phase(root, n, args.rank, args.epoch_sample, args.epoch_sample_above) if phase == "build"
                  else query_phase(root, n, args.rank))
        print(json.dumps(result))
        return
    lines = [f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} intra-op thread(s), "
             f"load average at start {os.getloadavg()[0]:.1f}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    print("\n".join(lines), flush=True)
    common = ["--threads", str(args.threads), "--epoch-sample", str(args.epoch_sample),
              "--epoch-sample-above", str(args.epoch_sample_above)]
    for n in args.n:
        for rank in args.ranks:
            root = args.workdir / f"n{n}-rank{rank}"
            shutil.rmtree(root, ignore_errors=True)  # a fresh build: nothing to reuse
            b = child([*common, "--rank", str(rank), "--child", "build", str(root), str(n)])
            q = child([*common, "--rank", str(rank), "--child", "query", str(root), str(n)])
            lines.append(table_row(b, q))
            print(lines[-1], f"(load {os.getloadavg()[0]:.1f})", flush=True)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    if args.write:
        with args.write.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
