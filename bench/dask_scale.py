"""The gradient index built and queried on Dask workers: time and peak memory against the
single-process build, for MiniLM on N SST-2 phrases (issue 14, docs/scaling.md).

    flock /tmp/bench.lock .venv/bin/python bench/dask_scale.py --n 8192 --workers 1 2 4

Same model and data as bench/index_scale.py (MiniLM, top 2 encoder layers + pooler + classifier;
the first N rows of a seeded permutation of ../shared/data/sst2/train.tsv; 100 dev sentences as
flagged queries), rank 16, `--shard-rows` rows per shard (default 1,024: 8 jobs at N = 8,192).
Rows, each into an empty index folder:
  this process   build_index with no shard map: one process, `--threads` intra-op threads
  W workers      a Dask LocalCluster of W single-threaded worker processes on loopback
                 (`shard_map(workers=W)`), started before the clock; the build, then the top-10 of
                 the 100 flagged with the per-shard jobs on the workers
Memory: this process's peak RSS (getrusage) and each worker's peak RSS (VmHWM, reset once the
worker has imported what a job needs, read after the run). The workers import before the clock.
The table also gives build seconds per 10k examples. The machine's core count
is printed: more workers than cores share them.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_scale import N_FLAGGED, TOP_K, flagged_set, load_model, training_set  # noqa: E402

MIB = 1024


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB


def _worker_ready() -> None:
    """On a worker, before the clock: the imports a job needs, and its peak RSS reset (VmHWM; a
    process started by fork inherits its parent's)."""
    import transformers  # noqa: F401

    import audit.influence.index.build  # noqa: F401

    Path("/proc/self/clear_refs").write_text("5")


def _hwm_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return float(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / MIB


def _worker_peaks(client) -> list[float]:
    return sorted(client.run(_hwm_mib).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shard-rows", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from distributed import Client, LocalCluster

    from audit.influence.index import IndexConfig, build_index
    from audit.influence.index.cluster import client_map

    config = IndexConfig(rank_in=16, rank_out=16, shard_rows=args.shard_rows)
    classifier, tokenizer = load_model()
    data, flagged = training_set(tokenizer, args.n), flagged_set(tokenizer)
    with tempfile.TemporaryDirectory() as scratch:  # warm-up: first-call costs out of the clock
        build_index(classifier, torch.utils.data.Subset(data, range(64)), scratch, config, progress=False)
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, N = {args.n}, {args.shard_rows} rows per shard, "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        index = build_index(classifier, data, Path(root) / "local", config, progress=False)
        build = time.perf_counter() - start
        start = time.perf_counter()
        index.top(classifier, flagged, k=TOP_K)
        query = time.perf_counter() - start
        rows.append(("this process", build, query, _peak_mib(), []))
        for workers in args.workers:
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                              dashboard_address=None) as cluster, Client(cluster) as client:
                client.run(_worker_ready)
                run = client_map(client, retries=2)
                start = time.perf_counter()
                sharded = build_index(classifier, data, Path(root) / f"dask{workers}", config, progress=False,
                                      shard_map=run)
                build = time.perf_counter() - start
                start = time.perf_counter()
                sharded.top(classifier, flagged, k=TOP_K, shard_map=run)
                query = time.perf_counter() - start
                if sharded.shards != index.shards:
                    raise SystemExit(f"the index built on {workers} workers differs from the single-process one")
                rows.append((f"{workers} Dask worker(s)", build, query, _peak_mib(), _worker_peaks(client)))
            print(f"done: {rows[-1][0]}", flush=True)
    print(f"\n| where | build s | build s per 10k | top-{TOP_K} of {N_FLAGGED} flagged s | peak RSS this process MiB "
          "| peak RSS per worker MiB |")
    print("|---|---|---|---|---|---|")
    for name, build, query, peak, workers in rows:
        per_worker = ", ".join(f"{w:.1f}" for w in workers) or "-"
        print(f"| {name} | {build:.1f} | {build * 10_000 / args.n:.0f} | {query:.2f} | {peak:.0f} | {per_worker} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
