"""Correction strategies and baselines side by side on the digits CNN (10% flipped labels).

    OMP_NUM_THREADS=1 .venv/bin/python bench/correction.py                 # 10 seeds, ~70 min on one loaded core
    OMP_NUM_THREADS=1 .venv/bin/python bench/correction.py --seeds 0 1 2   # quicker
    OMP_NUM_THREADS=1 .venv/bin/python bench/correction.py --write /tmp/correction.md
    (then merge into bench/RESULTS.md)
    # re-scoring side by side (issue 13): grad-dot, EK-FAC fitted once, the gradient index, and
    # EK-FAC refitted every round (--refit, the behaviour before the curvature was reused)
    .venv/bin/python bench/correction.py --seeds 0 1 2 --methods graddot ekfac index --refit --threads 2
        --only-extra --no-horizon --modes per-query --per-query "{'strategy':'reinforce'}"   # (one line)

Per seed: `load_digits_splits(0.1, seed)`, SmallResNet trained with the default TrainConfig,
flagged = mispredictions on the production split with reviewer labels = true labels, held-out =
the validation split (never seen by any repair). `--methods` are CorrectionConfig methods: an
influence method (its curvature fitted once on the trained model and reused by every round and
query) or "index" (a gradient index built once for the trained model, default IndexConfig).
Round-0 scores are computed in the setup, as the repair would (timed per method, printed);
row seconds cover the repairs, including the one fit or index build each repair_per_query
makes on its first re-score. Digits flags only ~6-9 mispredictions per seed,
so fix rates are pooled over seeds (fixed / flagged, counts printed). Held-out change: batch
mode, mean over seeds of (after - before) validation accuracy; per-query mode, mean over all
single-query repairs. Relabel precision: fraction of applied (or proposed) relabels that restore
the clean label of an injected flip. Every row runs on the same models and scores in one process.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import platform
import time

import numpy as np
import pandas as pd
import torch
from baselines import repair_flagged_finetune, repair_random

from audit.correction import (
    PER_QUERY_CONFIG,
    CorrectionConfig,
    influence_horizon,
    influence_scorer,
    propose_corrections,
    repair_batch,
    repair_per_query,
)
from audit.correction.rescoring import rescoring
from audit.demo.digits import load_digits_splits
from audit.demo.models import SmallResNet
from audit.influence import registry
from audit.training import TrainConfig, accuracy, predict_logits, train


@dataclasses.dataclass
class Case:
    """One seed's trained model, data and precomputed scores."""

    seed: int
    model: torch.nn.Module
    splits: object
    flagged: object
    scores: dict  # method -> [Q, N]
    # method -> seconds the round-0 scores took (fit or index build included)
    score_seconds: dict = dataclasses.field(default_factory=dict)

    def heldout(self, model) -> float:
        return accuracy(model, self.splits.validation.inputs, self.splits.validation.labels)


def build_case(seed: int, methods: list[str], cache: str | None = None) -> Case:
    splits = load_digits_splits(0.1, seed)
    torch.manual_seed(seed)
    model = SmallResNet()
    path = os.path.join(cache, f"digits-smallresnet-{seed}.pt") if cache else None
    if path and os.path.exists(path):
        model.load_state_dict(torch.load(path))
    else:
        train(model, splits.train.dataset(), TrainConfig(seed=seed))
        if path:
            torch.save(model.state_dict(), path)
    model.eval()
    predicted = predict_logits(model, splits.production.inputs).argmax(dim=1)
    flagged = splits.production.subset((predicted != splits.production.labels).nonzero().flatten().numpy())
    scores, seconds = {}, {}
    for m in methods:
        start = time.perf_counter()
        with rescoring(model, splits.train, m) as scorer:
            scores[m] = scorer(model, splits.train, flagged)
        seconds[m] = time.perf_counter() - start
    return Case(seed, model, splits, flagged, scores, seconds)


def precision(case: Case, relabels: dict[str, int]) -> tuple[int, int]:
    """(relabels restoring the clean label, relabels)."""
    position = {tid: i for i, tid in enumerate(case.splits.train.ids)}
    clean = case.splits.clean_train_labels
    return sum(int(clean[position[t]]) == label for t, label in relabels.items()), len(relabels)


def fixed_count(model, flagged) -> int:
    return int((predict_logits(model, flagged.inputs).argmax(dim=1) == flagged.labels).sum())


def run_batch(cases, name, fn) -> dict:
    fixed = total = good = proposed = 0
    changes, seconds, cpu = [], 0.0, 0.0
    for case in cases:
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn(case)
        seconds += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        fixed += fixed_count(result.model, case.flagged)
        total += len(case.flagged)
        changes.append(case.heldout(result.model) - case.heldout(case.model))
        g, n = precision(case, result.relabels)
        good, proposed = good + g, proposed + n
    return row(name, "batch", fixed, total, changes, good, proposed, seconds, cpu)


def run_per_query(cases, name, fn) -> dict:
    """One per-query row; also prints its round-budget curve (see `budget_curve`)."""
    fixed = total = good = proposed = 0
    changes, seconds, cpu, records = [], 0.0, 0.0, []
    for case in cases:
        start, start_cpu = time.perf_counter(), time.process_time()
        results = fn(case)
        seconds += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        base = case.heldout(case.model)
        for q, result in enumerate(results):
            fixed_q = fixed_count(result.model, case.flagged.subset([q]))
            fixed += fixed_q
            changes.append(case.heldout(result.model) - base)
            records.append((bool(fixed_q), result.rounds, changes[-1]))
            g, n = precision(case, result.relabels)
            good, proposed = good + g, proposed + n
        total += len(case.flagged)
    print(f"round budget of {name}:\n{markdown(budget_curve(records))}", flush=True)
    return row(name, "per-query", fixed, total, changes, good, proposed, seconds, cpu)


def budget_curve(records: list[tuple[bool, int, float]], budgets=None) -> pd.DataFrame:
    """Per-query results under smaller round budgets, from one run's (fixed, rounds run, held-out
    change) per query. Exact because a query's repair does not depend on the budget and a query not
    fixed within it keeps the input model (best round = round 0): fixed within R rounds, and the
    mean held-out change over all queries counting only those. Default budgets: 5, 10, ... up to
    the most rounds any query ran (at least 30)."""
    n = max(len(records), 1)
    if budgets is None:
        budgets = range(5, max([30] + [rounds for _, rounds, _ in records]) + 1, 5)
    out = []
    for budget in budgets:
        inside = [change for fixed, rounds, change in records if fixed and rounds <= budget]
        out.append({"rounds": budget, "fixed": f"{len(inside)}/{len(records)}", "fix_rate": len(inside) / n,
                    "heldout_change_pts": 100 * sum(inside) / n})
    return pd.DataFrame(out)


def row(name, mode, fixed, total, changes, good, proposed, seconds, cpu_seconds=float("nan")) -> dict:
    """One table row; `cpu_seconds` is the process's CPU time (all its threads): on a shared machine
    it moves less with the other processes' load than the wall-clock `seconds`."""
    return {"row": name, "mode": mode, "fixed": f"{fixed}/{total}", "fix_rate": fixed / max(total, 1),
            "heldout_change_pts": 100 * float(np.mean(changes)), "worst_change_pts": 100 * float(np.min(changes)),
            "relabel_precision": good / proposed if proposed else float("nan"), "relabels": proposed,
            "seconds": seconds, "cpu_seconds": cpu_seconds}


def candidate_precision(cases, method: str, k: int) -> dict:
    """Precision of propose_corrections' relabel rows (all proposals, not only applied ones)."""
    good = total = removed = review = 0
    for case in cases:
        predicted = predict_logits(case.model, case.flagged.inputs).argmax(dim=1)
        probs = predict_logits(case.model, case.splits.train.inputs).softmax(dim=1)
        frame = propose_corrections(case.scores[method], case.splits.train, case.flagged, predicted, None, k=k,
                                    train_probs=probs)
        relabel = frame[frame["action"] == "relabel"]
        g, n = precision(case, dict(zip(relabel["train_id"], relabel["proposed_label"].astype(int), strict=True)))
        good, total = good + g, total + n
        removed += int((frame["action"] == "remove").sum())
        review += int((frame["action"] == "review").sum())
    return {"method": method, "k": k, "relabel_rows": total, "precision": good / max(total, 1),
            "remove_rows": removed, "review_rows": review}


def horizon_table(cases, config: CorrectionConfig, method: str) -> pd.DataFrame:
    frames = [influence_horizon(c.model, c.splits.train, c.flagged, config, scores=c.scores[method]) for c in cases]
    pooled = pd.concat(frames)
    return pooled.groupby("steps").agg(pearson=("pearson", "mean"), spearman=("spearman", "mean"),
                                       n_pairs=("n_pairs", "sum")).reset_index()


def markdown(frame: pd.DataFrame) -> str:
    """Pipe table without the optional `tabulate` dependency."""
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


DEFAULT_CONFIG = CorrectionConfig()


def describe(config: CorrectionConfig, method: str, per_query: bool = False) -> str:
    """Row label: strategy, influence method and the budget of a config."""
    text = f"{config.strategy} [{method}] k={config.k} steps={config.steps}x{config.rounds} lr={config.lr} " \
           f"{config.optimizer} replay={config.replay_size}"
    return text if per_query else f"{text} reinforce_k={config.reinforce_k}"


def strategy_rows(cases, method: str, batch_base: CorrectionConfig = DEFAULT_CONFIG,
                  per_query_base: CorrectionConfig = PER_QUERY_CONFIG, extra_batch=(), extra_per_query=(),
                  only_extra: bool = False, upper_bound: bool = True, suffix: str = "",
                  modes: tuple[str, ...] = ("batch", "per-query"),
                  strategies: tuple[str, ...] = ("reinforce", "relabel", "unlearn")) -> list[dict]:
    """Every strategy in batch mode (from `batch_base`) and per-query mode (from `per_query_base`),
    each followed by its random baseline with the same config; `extra_batch` (configs) and
    `extra_per_query` (dicts of fields over `per_query_base`) add tuning rows without baselines;
    `only_extra` runs only those. `suffix` is appended to every row label (e.g. " (tuned)").
    `modes` limits the rows to batch and/or per-query mode (an upper-bound row for each, see
    `upper_bound_rows`); `strategies` limits the strategy rows."""
    rows = []

    def add(result: dict) -> None:
        result["row"] += suffix
        rows.append(result)
        print(rows[-1], flush=True)

    batch_default = dataclasses.replace(batch_base, method=method)
    configs = [] if "batch" not in modes else list(extra_batch) if only_extra else [
        dataclasses.replace(batch_default, strategy=strategy) for strategy in ("relabel", "reinforce", "unlearn")
        if strategy in strategies
    ] + list(extra_batch)
    for config in configs:
        add(run_batch(cases, describe(config, method), lambda c, cfg=config: repair_batch(
            c.model, c.splits.train, c.flagged, dataclasses.replace(cfg, method=method), c.scores[method])))
        if not only_extra:
            add(run_batch(cases, f"random baseline ({config.strategy})", lambda c, cfg=config: repair_random(
                c.model, c.splits.train, c.flagged, cfg)))
            add(run_batch(cases, f"random baseline, unfiltered ({config.strategy})",
                          lambda c, cfg=config: repair_random(c.model, c.splits.train, c.flagged, cfg, filtered=False)))
    per_query = dataclasses.replace(per_query_base, method=method)
    if "per-query" not in modes:
        extra_per_query = ()
    for spec in extra_per_query:
        config = dataclasses.replace(per_query, **spec)
        add(run_per_query(cases, describe(config, method, per_query=True), lambda c, cfg=config: repair_per_query(
            c.model, c.splits.train, c.flagged, cfg, c.scores[method])))
    if only_extra:
        return rows
    for strategy in strategies if "per-query" in modes else ():
        config = dataclasses.replace(per_query, strategy=strategy)
        add(run_per_query(cases, describe(config, method, per_query=True), lambda c, cfg=config: repair_per_query(
            c.model, c.splits.train, c.flagged, cfg, c.scores[method])))
        add(run_per_query(cases, f"random baseline ({strategy})", lambda c, cfg=config: repair_random(
            c.model, c.splits.train, c.flagged, cfg, per_query=True)))
        add(run_per_query(cases, f"random baseline, unfiltered ({strategy})", lambda c, cfg=config: repair_random(
            c.model, c.splits.train, c.flagged, cfg, per_query=True, filtered=False)))
    if upper_bound:
        rows += upper_bound_rows(cases, batch_base, per_query_base, modes, suffix)
    return rows


def upper_bound_rows(cases, batch_base: CorrectionConfig = DEFAULT_CONFIG,
                     per_query_base: CorrectionConfig = PER_QUERY_CONFIG,
                     modes: tuple[str, ...] = ("batch", "per-query"), suffix: str = "") -> list[dict]:
    """Fine-tuning on the flagged examples themselves (no influence): a batch row with `batch_base`'s
    budget and a per-query row with `per_query_base`'s (stopping once each query is fixed)."""
    name = "flagged fine-tuning (upper bound, trains on the evaluation data)" + suffix
    rows = []
    if "batch" in modes:
        rows.append(run_batch(cases, name, lambda c: repair_flagged_finetune(c.model, c.splits.train, c.flagged,
                                                                             batch_base)))
    if "per-query" in modes:
        rows.append(run_per_query(cases, name, lambda c: repair_flagged_finetune(
            c.model, c.splits.train, c.flagged, per_query_base, per_query=True)))
    for result in rows:
        print(result, flush=True)
    return rows


def refit_rows(cases, method: str, per_query_base: CorrectionConfig, extra_per_query=()) -> list[dict]:
    """Per-query rows (the `extra_per_query` dicts over `per_query_base`) re-scoring with `method`
    refitted at every round's model: the behaviour before the fitted curvature was reused."""
    rows = []
    for spec in extra_per_query:
        config = dataclasses.replace(per_query_base, method=method, **spec)
        rows.append(run_per_query(cases, describe(config, method, per_query=True) + " refit every round",
                                  lambda c, cfg=config: repair_per_query(c.model, c.splits.train, c.flagged, cfg,
                                                                         c.scores[method],
                                                                         scorer=influence_scorer(method))))
        print(rows[-1], flush=True)
    return rows


def horizon_sections(cases, method: str, settings=(("sgd", 1e-3), ("adam", DEFAULT_CONFIG.lr)),
                     base: CorrectionConfig = DEFAULT_CONFIG) -> list[str]:
    """One influence-horizon table per (optimizer, lr), top-10 subsets."""
    sections = []
    for optimizer, lr in settings:
        config = dataclasses.replace(base, k=10, optimizer=optimizer, lr=lr)
        title = f"Influence horizon [{method}], top-10 helpful / harmful / random subsets, {optimizer} lr={lr}:"
        sections += [title, markdown(horizon_table(cases, config, method))]
    return sections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--methods", nargs="+", default=["graddot"], help="influence methods to compare")
    parser.add_argument("--batch", nargs="*", default=None,
                        help="extra batch configs as python dicts of CorrectionConfig fields (tuning)")
    parser.add_argument("--per-query", nargs="*", default=None,
                        help="extra per-query configs as python dicts of CorrectionConfig fields (tuning)")
    parser.add_argument("--only-extra", action="store_true", help="run only the --batch / --per-query configs")
    parser.add_argument("--upper-bound-only", action="store_true", help="run only the upper-bound rows")
    parser.add_argument("--per-query-base", default=None,
                        help="fields over PER_QUERY_CONFIG (python dict) for the per-query rows and their baselines")
    parser.add_argument("--modes", nargs="+", default=["batch", "per-query"], choices=("batch", "per-query"))
    parser.add_argument("--strategies", nargs="+", default=["reinforce", "relabel", "unlearn"],
                        choices=("reinforce", "relabel", "unlearn"))
    parser.add_argument("--no-horizon", action="store_true")
    parser.add_argument("--refit", action="store_true",
                        help="also run the --per-query configs of every curvature method with a refit every round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--model-cache", default=None, help="folder to keep trained models between runs (tuning)")
    parser.add_argument("--write", default=None, help="write the markdown tables to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    cases = [build_case(seed, args.methods, args.model_cache) for seed in args.seeds]
    setup_s = time.perf_counter() - start
    counts = ", ".join(f"{c.seed}:{len(c.flagged)}" for c in cases)
    print(f"# seeds {args.seeds}; flagged per seed {counts}; total {sum(len(c.flagged) for c in cases)}; "
          f"setup {setup_s:.0f}s", flush=True)
    scoring = {m: sum(c.score_seconds[m] for c in cases) for m in args.methods}
    print("round-0 scoring seconds, summed over seeds: " + ", ".join(f"{m} {s:.1f}" for m, s in scoring.items()),
          flush=True)

    extra_batch = [CorrectionConfig(**ast.literal_eval(spec)) for spec in (args.batch or [])]
    extra_per_query = [ast.literal_eval(spec) for spec in (args.per_query or [])]
    per_query_base = dataclasses.replace(PER_QUERY_CONFIG, **ast.literal_eval(args.per_query_base or "{}"))
    rows = []
    for method in [] if args.upper_bound_only else args.methods:
        rows += strategy_rows(cases, method, per_query_base=per_query_base, extra_batch=extra_batch,
                              extra_per_query=extra_per_query, only_extra=args.only_extra, upper_bound=False,
                              modes=tuple(args.modes), strategies=tuple(args.strategies))
    for method in args.methods if args.refit and "per-query" in args.modes else []:  # last: the slowest rows
        if getattr(registry.find(method), "fit", None) is not None:
            rows += refit_rows(cases, method, per_query_base, extra_per_query)
    if not args.only_extra:  # the upper bounds use no influence: once, not per method
        rows += upper_bound_rows(cases, per_query_base=per_query_base, modes=tuple(args.modes))

    table = pd.DataFrame(rows)
    sections = [f"Seeds {args.seeds}; flagged per seed {counts} (total {sum(len(c.flagged) for c in cases)}).",
                "Round-0 scoring seconds (setup, summed over seeds): "
                + ", ".join(f"{m} {s:.1f}" for m, s in scoring.items()) + ".",
                markdown(table)]
    if not args.only_extra and not args.upper_bound_only:
        cands = pd.DataFrame([candidate_precision(cases, m, k) for m in args.methods for k in (1, 3, 10)])
        sections += ["Correction candidates (propose_corrections relabel rows, with model probabilities):",
                     markdown(cands)]
    if not args.no_horizon:
        for method in args.methods:
            sections += horizon_sections(cases, method)
    sections.append(f"Machine: {platform.processor() or platform.machine()}, torch threads {args.threads}, "
                    f"total {time.perf_counter() - start:.0f}s.")
    emit(sections, args.write)


def emit(sections: list[str], path: str | None) -> None:
    """Print the markdown sections and, when `path` is given, write them there too."""
    text = "\n\n".join(sections)
    print(text)
    if path:
        with open(path, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
