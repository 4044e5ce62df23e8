"""Benchmark-only baselines (never register their models).

- random (filtered): the strategy's own round loop and budget, with random scores instead of
  influence (same filters, same k, steps, replay), so any gap measures what influence adds on
  top of the strategy's non-influence filters.
- random (unfiltered): random training examples with the same budget and nothing else (each
  still-wrong query draws k eligible examples; relabel gives them the query's reviewer label):
  the issue's "random training examples with the same budget".
- flagged fine-tuning: steps on the flagged examples themselves with the reviewer's labels. It
  trains on the evaluation data, so its fix rate is an upper bound, not a fair comparison.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from audit.correction.batch import check_inputs, repair_rounds
from audit.correction.config import CorrectionConfig, RepairResult
from audit.correction.finetune import finetune_steps
from audit.correction.strategies import Plan, plan_round
from audit.examples import ExampleTable
from audit.training import predict_logits


def random_scorer(seed: int):
    """Scorer returning standard-normal scores [Q, N] from a generator seeded once with `seed`."""
    generator = torch.Generator().manual_seed(seed)

    def score(model: nn.Module, train: ExampleTable, queries: ExampleTable) -> torch.Tensor:
        return torch.randn(len(queries), len(train), generator=generator)

    return score


def unfiltered_plan(strategy: str, scores: torch.Tensor, train_labels: torch.Tensor, predicted: torch.Tensor,
                    reviewer: torch.Tensor, k: int, eligible: torch.Tensor, *_unused) -> Plan:
    """A Planner with no filter: each query's `k` highest (random) scores among `eligible` [N];
    reinforce descends on them at their labels, unlearn ascends on them, relabel gives them the
    query's reviewer label. `scores` [Q, N], `reviewer` [Q]."""
    chosen: dict[int, int] = {}  # train position -> the query that drew it (first one wins)
    for q, row in enumerate(scores.masked_fill(~eligible, float("-inf"))):
        for i in torch.topk(row, min(k, int(eligible.sum()))).indices.tolist():
            chosen.setdefault(i, q)
    positions = tuple(chosen)
    if strategy == "unlearn":
        return Plan(ascend=positions)
    if strategy == "reinforce":
        return Plan(descend=positions, descend_labels=tuple(int(train_labels[i]) for i in positions))
    relabels = {i: int(reviewer[q]) for i, q in chosen.items() if int(reviewer[q]) != int(train_labels[i])}
    return Plan(descend=tuple(relabels), descend_labels=tuple(relabels.values()), relabels=relabels)


def repair_random(model: nn.Module, train: ExampleTable, flagged: ExampleTable, config: CorrectionConfig,
                  per_query: bool = False, filtered: bool = True) -> RepairResult | list[RepairResult]:
    """`repair_batch` (or, with `per_query`, `repair_per_query`) with random scores in every round;
    with `filtered=False` also without the strategy's filters (`unfiltered_plan`)."""
    planner = plan_round if filtered else unfiltered_plan
    if per_query:
        exclude = frozenset(flagged.ids)
        return [repair_rounds(model, train, flagged.subset([q]), config, None, random_scorer(config.seed + q), exclude,
                              planner)
                for q in range(len(flagged))]
    return repair_rounds(model, train, flagged, config, None, random_scorer(config.seed), planner=planner)


def repair_flagged_finetune(model: nn.Module, train: ExampleTable, flagged: ExampleTable,
                            config: CorrectionConfig, per_query: bool = False) -> RepairResult | list[RepairResult]:
    """Upper bound: `config.steps * config.rounds` steps on the flagged examples at their reviewer
    labels, plus a replay sample of `config.replay_size` training examples the model fits.
    With `per_query`, one copy per flagged example (result q trains on row q alone): `config.steps`
    steps per round, stopping after the first round that fixes it, at most `config.rounds` rounds;
    a query never fixed keeps the input model, as in `repair_per_query`.
    Trains on the evaluation data: report it, never register it."""
    check_inputs(train, flagged, None)
    generator = torch.Generator().manual_seed(config.seed)
    fits = (predict_logits(model, train.inputs).argmax(dim=1) == train.labels).nonzero().flatten()  # [M]
    replay = fits[torch.randperm(len(fits), generator=generator)[: config.replay_size]]
    if not per_query:
        return _finetune_on(model, flagged, train, replay, config, stop_when_fixed=False)
    return [_finetune_on(model, flagged.subset([q]), train, replay, config, stop_when_fixed=True)
            for q in range(len(flagged))]


def _finetune_on(model: nn.Module, examples: ExampleTable, train: ExampleTable, replay: torch.Tensor,
                 config: CorrectionConfig, stop_when_fixed: bool) -> RepairResult:
    repaired = copy.deepcopy(model)
    history, steps_taken, fixed = [], 0, 0.0
    # without early stopping the rounds are one run of rounds x steps (one optimizer state)
    chunks = [config.steps] * config.rounds if stop_when_fixed else [config.steps * config.rounds]
    for round_index, steps in enumerate(chunks, start=1):
        losses = finetune_steps(repaired, examples.inputs, examples.labels, steps, config.lr,
                                optimizer=config.optimizer, replay_inputs=train.inputs[replay],
                                replay_labels=train.labels[replay])
        steps_taken += steps
        fixed = (predict_logits(repaired, examples.inputs).argmax(dim=1) == examples.labels).float().mean().item()
        history.append({"round": round_index, "fixed_fraction": fixed, "still_wrong": len(examples), "selected": 0,
                        "relabels": 0, "steps": steps, "loss_start": losses[0], "loss_end": losses[-1]})
        if stop_when_fixed and fixed == 1.0:
            break
    if stop_when_fixed and fixed < 1.0:  # never fixed: keep the input model (best round = round 0)
        repaired, steps_taken = copy.deepcopy(model), 0
    return RepairResult(model=repaired, steps_taken=steps_taken, rounds=len(history), selected_ids=(), relabels={},
                        history=tuple(history))
