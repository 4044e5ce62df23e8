"""What re-ranking the index's shortlists costs an audit as the training set grows (issue 13):
MiniLM on N SST-2 phrases, 100 flagged sentences, bench/index_scale.py's model and data.

    flock /tmp/bench.lock .venv/bin/python bench/index_rerank_scale.py --n 5000

One process per N (peak RSS by getrusage, so the N are run one per call): build the rank-16 index
(timed), its top-10 of the 100 flagged (timed), fit the re-ranking EK-FAC
(audit.influence.index.rerank.fit_reranker: on all N, or a seeded 2,048-row sample above that;
timed), then the re-ranked top-10 with each `--shortlists` (timed, with the number of training
examples the pooled shortlists hold, which the engine scores exactly). Threads as index_scale
(`--threads`, default 1). Quality is measured against the unprojected reference in
bench/index_rerank.py, where that reference is affordable.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import index_scale as scale  # noqa: E402

from audit.influence.index import build_index  # noqa: E402
from audit.influence.index.rerank import fit_reranker, rerank  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--shortlists", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classifier, tokenizer = scale.load_model()
    data, flagged = scale.training_set(tokenizer, args.n), scale.flagged_set(tokenizer)
    print(f"N = {len(data):,}, {len(flagged)} flagged, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as root:
        index, build_s = scale.timed(lambda: build_index(classifier, data, root, scale.index_config(16),
                                                         progress=False))
        _, top_s = scale.timed(lambda: index.top(classifier, flagged, k=scale.TOP_K))
        reranker, fit_s = scale.timed(lambda: fit_reranker(index, classifier, data))
        print("| N | build s | index top-10 s | re-rank fit s (rows) | shortlist | rows scored exactly "
              "| re-ranked top-10 s | peak RSS MiB |\n|---|---|---|---|---|---|---|---|", flush=True)
        for shortlist in args.shortlists:
            short, rerank_s = scale.timed(lambda shortlist=shortlist: rerank(index, reranker, classifier, flagged,
                                                                             shortlist))
            short.top(scale.TOP_K)
            print(f"| {len(data):,} | {build_s:.1f} | {top_s:.2f} | {fit_s:.1f} ({reranker.fit_rows:,}) | {shortlist} "
                  f"| {len(short.rows):,} | {rerank_s:.1f} | {scale.peak_mib():.0f} |", flush=True)


if __name__ == "__main__":
    main()
