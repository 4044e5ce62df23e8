"""Batch mode: one repaired model for the whole flagged batch (the version that gets registered).

Each round scores the still-wrong flagged queries against the current model, lets the strategy
pick training examples, and takes `steps` fine-tuning steps on them plus a replay sample. The
flagged examples themselves are never trained on.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from audit.correction.config import CorrectionConfig, RepairResult
from audit.correction.finetune import finetune_steps
from audit.correction.rescoring import Scorer, rescoring
from audit.correction.strategies import Plan, Planner, plan_round
from audit.errors import InvalidInput, NumericalError
from audit.examples import ExampleTable
from audit.training import predict_logits


def repair_batch(
    model: nn.Module, train: ExampleTable, flagged: ExampleTable, config: CorrectionConfig,
    scores: torch.Tensor | None = None, scorer: Scorer | None = None,
) -> RepairResult:
    """Repair a copy of `model` so that the flagged examples get their reviewer labels
    (`flagged.labels`), in up to `config.rounds` rounds with re-scoring of the still-wrong queries.

    `scores` [Q, N] (optional) are influence scores of `flagged` against `train` for the input
    model (sign: positive = helpful); computed with `config.method` when None. Training examples
    whose id is also a flagged id are never selected or replayed. Stops early when every flagged
    example is fixed or `config.target_fix_rate` is reached. The returned model (and its
    `steps_taken`, `selected_ids`, `relabels`) is the one after the round with the highest fixed
    fraction of the flagged batch, earliest on ties (later rounds can undo earlier fixes);
    `history` lists every round run.

    Re-scoring uses `config.method`, its curvature fitted (or its index built) once on `model`
    (audit.correction.rescoring); `scorer` replaces that (e.g. one over an index the caller keeps).
    """
    check_inputs(train, flagged, scores)
    with rescoring(model, train, config.method, scorer) as rescore:
        return repair_rounds(model, train, flagged, config, scores, rescore)


def check_inputs(train: ExampleTable, flagged: ExampleTable, scores: torch.Tensor | None) -> None:
    """Raise InvalidInput for an empty flagged batch or training set, or scores not [Q, N]."""
    if len(flagged) == 0:
        raise InvalidInput("The flagged batch is empty; flag at least one misprediction to repair.")
    if len(train) == 0:
        raise InvalidInput("The training set is empty; corrections need training examples to fine-tune on.")
    if scores is not None and tuple(scores.shape) != (len(flagged), len(train)):
        raise InvalidInput(f"scores must have shape [flagged, train] = [{len(flagged)}, {len(train)}]; "
                           f"found {list(scores.shape)}.")


def repair_rounds(
    model: nn.Module, train: ExampleTable, flagged: ExampleTable, config: CorrectionConfig,
    scores: torch.Tensor | None, scorer: Scorer, exclude_ids: frozenset[str] = frozenset(),
    planner: Planner = plan_round,
) -> RepairResult:
    """The round loop shared by repair_batch, repair_per_query and the random baselines; training
    examples whose id is in `flagged` or `exclude_ids` are never trained on. `planner` turns a
    round's scores into a Plan (the strategies' `plan_round` unless a baseline replaces it)."""
    check_inputs(train, flagged, scores)
    repaired = copy.deepcopy(model)
    repaired.eval()
    generator = torch.Generator().manual_seed(config.seed)
    flagged_ids = set(flagged.ids) | exclude_ids
    eligible = torch.tensor([i not in flagged_ids for i in train.ids])  # [N]
    labels = train.labels.clone()  # current labels, edited by relabel rounds
    relabels: dict[int, int] = {}
    selected: dict[int, None] = {}
    history = []
    steps_taken = 0
    predicted = predict_logits(repaired, flagged.inputs).argmax(dim=1)  # [Q]
    original_probs = predict_logits(repaired, train.inputs).softmax(dim=1) if config.soft_replay else None  # [N, C]
    # later rounds chase the still-wrong queries and can undo earlier fixes: keep the best round
    best = (_fraction(predicted, flagged.labels), _snapshot(repaired, 0, relabels, selected))
    for round_index in range(config.rounds):
        wrong = (predicted != flagged.labels).nonzero().flatten()
        fixed = _fraction(predicted, flagged.labels)
        if len(wrong) == 0 or (config.target_fix_rate is not None and fixed >= config.target_fix_rate):
            break
        queries = flagged.subset(wrong.numpy())
        current = ExampleTable(train.ids, train.inputs, labels)
        if round_index == 0 and scores is not None:
            round_scores = scores[wrong]  # [Q', N]
        else:
            round_scores = scorer(repaired, current, queries)  # [Q', N]
        probs = predict_logits(repaired, train.inputs).softmax(dim=1)  # [N, C]
        plan = planner(config.strategy, round_scores, labels, predicted[wrong], queries.labels,
                          config.k, eligible, probs, config.min_confidence, config.reinforce_k)
        for i, label in plan.relabels.items():
            labels[i] = label
        relabels.update(plan.relabels)
        selected.update((i, None) for i in plan.selected)
        if not plan.selected and not relabels:
            history.append(_entry(round_index, fixed, len(wrong), plan, relabels, 0, []))
            break
        # replay anchors what the model already gets right: replaying examples it does not fit
        # (mostly label noise at 10% flips) would teach it the noise
        fits = probs.argmax(dim=1) == labels  # [N]
        descend, replay, ascend = _batch(plan, relabels, eligible & fits, config.replay_size, generator)
        losses = finetune_steps(repaired, train.inputs[descend], labels[descend], config.steps, config.lr,
                                optimizer=config.optimizer,
                                replay_inputs=train.inputs[replay],
                                replay_labels=labels[replay] if original_probs is None else original_probs[replay],
                                ascent_inputs=train.inputs[ascend], ascent_labels=labels[ascend],
                                ascent_bound=config.ascent_bound)
        steps_taken += config.steps
        logits = predict_logits(repaired, flagged.inputs)  # [Q, C]
        if not torch.isfinite(logits).all():
            raise NumericalError(f"The model's outputs became non-finite after round {round_index + 1} "
                                 f"({config.steps} steps at lr {config.lr:g}); lower the learning rate.")
        predicted = logits.argmax(dim=1)
        fixed_after = _fraction(predicted, flagged.labels)
        history.append(_entry(round_index, fixed_after, len(wrong), plan, relabels, config.steps, losses))
        if fixed_after > best[0]:
            best = (fixed_after, _snapshot(repaired, steps_taken, relabels, selected))
    state, best_steps, best_relabels, best_selected = best[1]
    repaired.load_state_dict(state)
    return RepairResult(
        model=repaired, steps_taken=best_steps, rounds=len(history),
        selected_ids=tuple(train.ids[i] for i in best_selected),
        relabels={train.ids[i]: int(v) for i, v in best_relabels.items()}, history=tuple(history),
    )


def _fraction(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Fixed fraction as an exact ratio of counts, so that targets compare reliably."""
    return int((predicted == labels).sum()) / len(labels)


def _snapshot(model: nn.Module, steps: int, relabels: dict[int, int], selected: dict[int, None]):
    return copy.deepcopy(model.state_dict()), steps, dict(relabels), dict(selected)


def _batch(plan: Plan, relabels: dict[int, int], pool: torch.Tensor, replay_size: int,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train positions to descend on (the plan's and every edit so far), to replay (a seeded
    sample of `pool` [N] outside those) and to ascend on."""
    descend = list(dict.fromkeys(list(plan.descend) + list(relabels)))
    pool = pool.clone()
    pool[descend + list(plan.ascend)] = False
    candidates = pool.nonzero().flatten()  # [M]
    replay = candidates[torch.randperm(len(candidates), generator=generator)[:replay_size]]
    as_index = lambda items: torch.tensor(items, dtype=torch.int64)  # noqa: E731
    return as_index(descend), replay, as_index(list(plan.ascend))


def _entry(round_index: int, fixed: float, still_wrong: int, plan: Plan, relabels: dict, steps: int,
           losses: list[float]) -> dict:
    return {"round": round_index + 1, "fixed_fraction": fixed, "still_wrong": still_wrong,
            "selected": len(plan.selected), "relabels": len(relabels), "steps": steps,
            "loss_start": losses[0] if losses else None, "loss_end": losses[-1] if losses else None}
