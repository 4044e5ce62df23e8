"""How often the harm gates decide wrongly on the digits demo model, today's fixed thresholds
against the McNemar rule (audit.gates.metrics), side by side on the same repairs.

    .venv/bin/python bench/gate_error_rates.py                  # seeds 0-9, ~10 min on 2 cores
    .venv/bin/python bench/gate_error_rates.py --seeds 0 1 --draws 50

Per seed the demo's model is trained (flows.demo recipe: 60/30/10 split, 32-channel SmallResNet,
10% flipped labels). The held-out pool is the validation and production splits (~719 digits,
~72 per class), which no repair trains on. On that pool, as the finite population:
- natural repairs: the correct flow's repair candidates applied to the seed's flagged batch;
- injected harmful repairs: fine-tuning that teaches one class to look like another (a share
  of class c's training digits relabelled to d, trained on with the repair's own replay),
  three class pairs and two strengths per seed.
A repair is *harmful* when some class loses >= HARM_POINTS of recall on the whole pool, and
*harmless* when no class loses more than the 2-point threshold and pool accuracy drops by no
more than the 0.5-point threshold; others are reported as in between. Each gate rule then
decides on `--draws` random class-stratified samples of the gate split's size (2/3 of the
validation split, as the correct flow uses) and of the whole validation split's size. False
accept = accepted harmful repairs; false refuse = refused harmless ones. Gates: held-out
accuracy (0.5 points), class recall (2 points) and canary flips (2%), as in GateThresholds().
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import numpy as np
import torch

from audit.correction import repair_batch
from audit.correction.finetune import finetune_steps
from audit.correction.search import DEFAULT_CANDIDATES
from audit.demo.digits import NUM_CLASSES, load_digits_splits
from audit.gates import GateThresholds
from audit.gates.metrics import accuracy_gate, canary_gate, class_recall_gate
from audit.training import TrainConfig, predict_logits
from flows.demo import SPLIT_FRACTIONS, train_demo_model

HARM_POINTS = 5.0
# rule: (significance, resolution) of audit.gates.metrics' harm gates
RULES = {"fixed thresholds (today)": (None, 0), "more than 1 example lost net": (None, 1),
         "McNemar, p < 0.05": (0.05, 0), "McNemar, p < 0.2": (0.2, 0),
         "McNemar p < 0.2 and more than 1 lost net": (0.2, 1)}


def inject_harm(model, train, source: int, target: int, share: float, seed: int):
    """A copy of `model` fine-tuned to predict `target` for a `share` of class `source`'s training
    digits (10 Adam steps at the repair's lr, with a replay sample of the rest)."""
    import copy

    harmed = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    members = (train.labels == source).nonzero().flatten()
    chosen = members[torch.randperm(len(members), generator=g)[: max(1, int(share * len(members)))]]
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[chosen] = False
    replay = rest.nonzero().flatten()[torch.randperm(int(rest.sum()), generator=g)[:1000]]
    finetune_steps(harmed, train.inputs[chosen], torch.full((len(chosen),), target), 10, 4e-4, optimizer="adam",
                   replay_inputs=train.inputs[replay], replay_labels=train.labels[replay])
    return harmed


def truth(champion_pred, pred, labels) -> tuple[float, float]:
    """(largest class recall drop, accuracy drop), in points, on the whole pool."""
    drops = [float(((champion_pred[labels == c] == c).float().mean() - (pred[labels == c] == c).float().mean()) * 100)
             for c in range(NUM_CLASSES)]
    acc = float(((champion_pred == labels).float().mean() - (pred == labels).float().mean()) * 100)
    return max(drops), acc


def accepts(champion_pred, pred, labels, rule: tuple[float | None, int]) -> bool:
    t = GateThresholds()
    return (accuracy_gate(champion_pred, pred, labels, t.max_accuracy_drop_points, *rule).passed
            and class_recall_gate(champion_pred, pred, labels, NUM_CLASSES, t.max_class_recall_drop_points,
                                  *rule).passed
            and canary_gate(champion_pred, pred, labels, t.max_canary_flip_rate).passed)


def stratified_draws(labels: torch.Tensor, size: int, draws: int, rng: np.random.Generator) -> list[np.ndarray]:
    share = size / len(labels)
    out = []
    for _ in range(draws):
        parts = [rng.choice(np.flatnonzero(labels.numpy() == c), round(share * int((labels == c).sum())),
                            replace=False) for c in range(NUM_CLASSES)]
        out.append(np.concatenate(parts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []  # (kind, harm class, {(rule, size): acceptance rate})
    started = time.time()
    for seed in args.seeds:
        splits = load_digits_splits(noise_rate=0.1, seed=seed, fractions=SPLIT_FRACTIONS)
        model, _ = train_demo_model(splits, TrainConfig(seed=seed))
        pool_inputs = torch.cat([splits.validation.inputs, splits.production.inputs])
        labels = torch.cat([splits.validation.labels, splits.production.labels])
        champion_pred = predict_logits(model, pool_inputs).argmax(1)
        production_pred = champion_pred[len(splits.validation):]
        wrong = (production_pred != splits.production.labels).nonzero().flatten().numpy()
        flagged = splits.production.subset(wrong)
        repairs = []
        for candidate in DEFAULT_CANDIDATES:
            config = dataclasses.replace(candidate.config, target_fix_rate=0.5)
            repairs.append(("natural", repair_batch(model, splits.train, flagged, config).model))
        pairs = np.random.default_rng(seed).permutation(NUM_CLASSES)
        for j in range(3):
            for share in (0.1, 0.3):
                repairs.append(("injected", inject_harm(model, splits.train, int(pairs[j]), int(pairs[j + 3]),
                                                         share, seed)))
        sizes = {"gate split": round(len(splits.validation) * 2 / 3), "whole validation": len(splits.validation)}
        samples = {name: stratified_draws(labels, size, args.draws, rng) for name, size in sizes.items()}
        for kind, repaired in repairs:
            pred = predict_logits(repaired, pool_inputs).argmax(1)
            class_drop, acc_drop = truth(champion_pred, pred, labels)
            if class_drop >= HARM_POINTS:
                verdict = "harmful"
            elif class_drop <= 2.0 and acc_drop <= 0.5:
                verdict = "harmless"
            else:
                verdict = "in between"
            rates = {(name, size): float(np.mean([accepts(champion_pred[s], pred[s], labels[s], rule)
                                                   for s in samples[size]]))
                     for name, rule in RULES.items() for size in sizes}
            rows.append((kind, verdict, class_drop, acc_drop, rates))
        print(f"seed {seed}: {len(repairs)} repairs, {time.time() - started:.0f} s", flush=True)
    print(f"\nMachine: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; seeds {args.seeds}; {args.draws} draws per repair and size.\n")
    for verdict in ("harmful", "harmless", "in between"):
        group = [r for r in rows if r[1] == verdict]
        kinds = {k: sum(1 for r in group if r[0] == k) for k in ("natural", "injected")}
        print(f"{verdict}: {len(group)} repairs ({kinds['natural']} natural, {kinds['injected']} injected)")
    print("\n| rule | sample | false accept (harmful accepted) | false refuse (harmless refused) | "
          "in-between accepted |")
    print("|---|---|---|---|---|")
    for rule in RULES:
        for size in ("gate split", "whole validation"):
            cells = []
            for verdict, accept in (("harmful", True), ("harmless", False), ("in between", True)):
                group = [r[4][(rule, size)] for r in rows if r[1] == verdict]
                rate = np.mean(group) if accept else 1 - np.mean(group) if group else float("nan")
                cells.append(f"{rate:.1%}" if group else "n/a")
            print(f"| {rule} | {size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
