"""Benchmark-only baselines (never register their models).

- random: the strategy's own round loop and budget, with random scores instead of influence
  (same filters, same k, steps, replay), so any gap measures what influence adds.
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
from audit.examples import ExampleTable
from audit.training import predict_logits


def random_scorer(seed: int):
    """Scorer returning standard-normal scores [Q, N] from a generator seeded once with `seed`."""
    generator = torch.Generator().manual_seed(seed)

    def score(model: nn.Module, train: ExampleTable, queries: ExampleTable) -> torch.Tensor:
        return torch.randn(len(queries), len(train), generator=generator)

    return score


def repair_random(model: nn.Module, train: ExampleTable, flagged: ExampleTable, config: CorrectionConfig,
                  per_query: bool = False) -> RepairResult | list[RepairResult]:
    """`repair_batch` (or, with `per_query`, `repair_per_query`) with random scores in every round."""
    if per_query:
        exclude = frozenset(flagged.ids)
        return [repair_rounds(model, train, flagged.subset([q]), config, None, random_scorer(config.seed + q), exclude)
                for q in range(len(flagged))]
    return repair_rounds(model, train, flagged, config, None, random_scorer(config.seed))


def repair_flagged_finetune(model: nn.Module, train: ExampleTable, flagged: ExampleTable,
                            config: CorrectionConfig) -> RepairResult:
    """Upper bound: `config.steps * config.rounds` steps on the flagged examples at their reviewer
    labels, plus a replay sample of `config.replay_size` training examples the model fits.
    Trains on the evaluation data: report it, never register it."""
    check_inputs(train, flagged, None)
    repaired = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(config.seed)
    fits = (predict_logits(repaired, train.inputs).argmax(dim=1) == train.labels).nonzero().flatten()  # [M]
    replay = fits[torch.randperm(len(fits), generator=generator)[: config.replay_size]]
    steps = config.steps * config.rounds
    losses = finetune_steps(repaired, flagged.inputs, flagged.labels, steps, config.lr, optimizer=config.optimizer,
                            replay_inputs=train.inputs[replay], replay_labels=train.labels[replay])
    fixed = (predict_logits(repaired, flagged.inputs).argmax(dim=1) == flagged.labels).float().mean().item()
    entry = {"round": 1, "fixed_fraction": fixed, "still_wrong": len(flagged), "selected": 0, "relabels": 0,
             "steps": steps, "loss_start": losses[0], "loss_end": losses[-1]}
    return RepairResult(model=repaired, steps_taken=steps, rounds=1, selected_ids=(), relabels={},
                        history=(entry,))
