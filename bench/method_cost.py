"""Time and peak memory of one audit's scoring, per scoring method, scaled to 10k training
examples: MiniLM on SST-2 (docs/scaling.md, issue 14).

    flock /tmp/bench.lock .venv/bin/python bench/method_cost.py --n 128 --queries 20 --methods graddot ekfac index

Model and data as bench/index_scale.py (MiniLM, top 2 encoder layers + pooler + classifier
trainable: 3.7M parameters scored), the first N training phrases, `--queries` dev sentences as
the flagged examples. Each method runs in a fresh child process (its peak RSS, getrusage, is its
own; "before" is the peak after loading the model and data) and does what an audit does: the
scores of every training example on every query and the self-influence of every training
example (`audit.scoring.score_flagged`; the index's scores read in the audit's blocks). Seconds
per 10k = seconds x 10,000 / N: the engine's passes are linear in N (the index's build too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_scale import flagged_set, load_model, training_set  # noqa: E402

MIB = 1024


def _peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB


def _table(data: TensorDataset):
    from audit.examples import ExampleTable

    inputs, labels = data.tensors
    return ExampleTable(tuple(str(i) for i in range(len(labels))), inputs, labels)


def child(method: str, n: int, queries: int, threads: int) -> dict:
    from audit.scoring import score_flagged

    torch.set_num_threads(threads)
    classifier, tokenizer = load_model()
    train, flagged = _table(training_set(tokenizer, n)), _table(TensorDataset(*(t[:queries] for t in
                                                                               flagged_set(tokenizer).tensors)))
    before = _peak()
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        scored = score_flagged(classifier, train, flagged, method, cache, progress=False)
        for _ in scored.scores:  # the blocks an audit reads
            pass
        seconds = time.perf_counter() - start
    return {"method": method, "n": n, "queries": queries, "seconds": seconds, "per_10k_s": seconds * 10_000 / n,
            "peak_mib": _peak(), "before_mib": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=["graddot", "ekfac", "index"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.queries, args.threads)))
        return
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, N = {args.n}, "
          f"{args.queries} queries, load average at start {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for method in args.methods:
        out = subprocess.run([sys.executable, __file__, "--child", method, "--n", str(args.n), "--queries",
                              str(args.queries), "--threads", str(args.threads)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{method}: failed\n{out.stderr[-2000:]}", flush=True)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done: {method}", flush=True)
    print("\n| method | seconds (scores + self-influence) | seconds per 10k | peak RSS MiB (after loading) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['seconds']:.1f} | {r['per_10k_s']:,.0f} | {r['peak_mib']:.0f} "
              f"({r['before_mib']:.0f}) |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; numpy {np.__version__}")


if __name__ == "__main__":
    main()
