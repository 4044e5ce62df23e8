"""Stage `search_repairs`: try an ordered, bounded set of repair candidates and pick one on a
selection split that the gates never see.

    selection, gate_split = selection_split(validation, fraction=1/3)
    result = search_repairs(model, train, flagged, selection, num_classes, thresholds, DEFAULT_CANDIDATES)
    result.chosen            # the CandidateOutcome to gate and register, or None
    result.table()           # one row per candidate with its selection-gate results

One repair either passes the gates or misses by one validation example, so the correct flow
tries several. Choosing among them on the split the gates evaluate would overfit the gates, so
candidates are compared on a disjoint selection split (`selection_split`) with the prediction
gates (fix rate, held-out accuracy, class recall, canary flips), and only the chosen one is then
gated on the rest. The default set and its order were measured on the digits demo
(docs/correction.md, "Repair search").
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from audit.correction.batch import repair_batch
from audit.correction.config import CorrectionConfig, RepairResult
from audit.errors import InvalidInput, NumericalError
from audit.examples import ExampleTable
from audit.gates import GateReport, GateResult, GateThresholds
from audit.gates.evaluate import evaluate_prediction_gates


@dataclass(frozen=True)
class RepairCandidate:
    """One repair to try: a name a reviewer reads in the candidates table, and its config."""

    name: str
    config: CorrectionConfig


# Measured on the digits demo, seeds 0-9 (docs/correction.md, "Repair search"): editing the
# labels of harmful, unfit examples alone fixed the flagged digits while gaining about as many
# validation digits as it lost; also descending on each query's helpful examples (reinforce_k=5,
# the earlier single default) lost 3-8 more. Bounded ascent at a small learning rate rescued the
# seeds where relabelling found nothing safe; the earlier default stays last, for comparison.
DEFAULT_CANDIDATES: tuple[RepairCandidate, ...] = (
    RepairCandidate("relabel", CorrectionConfig(strategy="relabel", reinforce_k=0)),
    RepairCandidate("unlearn-gentle", CorrectionConfig(strategy="unlearn", lr=5e-5, rounds=5)),
    RepairCandidate("relabel-wide", CorrectionConfig(strategy="relabel", reinforce_k=0, k=10, rounds=5)),
    RepairCandidate("relabel-wide-gentle",
                    CorrectionConfig(strategy="relabel", reinforce_k=0, k=10, rounds=5, lr=1e-4)),
    RepairCandidate("relabel-reinforce", CorrectionConfig(strategy="relabel", reinforce_k=5)),
)
CANDIDATES_BY_NAME = {c.name: c for c in DEFAULT_CANDIDATES}


@dataclass(frozen=True)
class CandidateOutcome:
    """A tried candidate: its repair (None when its training diverged) and its prediction gates
    on the selection split (for a diverged candidate, one failed `stable_training` gate)."""

    candidate: RepairCandidate
    repair: RepairResult | None
    selection: GateReport


@dataclass(frozen=True)
class SearchResult:
    """Every candidate tried, in order, and the index of the chosen one (None: none passed)."""

    outcomes: tuple[CandidateOutcome, ...]
    chosen_index: int | None

    @property
    def chosen(self) -> CandidateOutcome | None:
        return None if self.chosen_index is None else self.outcomes[self.chosen_index]

    def with_full_model(self, full_model: Callable[[nn.Module], nn.Module]) -> SearchResult:
        """This result with the chosen candidate's repaired model passed through `full_model`, e.g.
        FrozenFeatures.full_model when the search repaired a model's head on its frozen features
        (the other candidates' models are not gated or registered, so they stay as they are)."""
        chosen = self.chosen
        if chosen is None or chosen.repair is None:
            return self
        repair = dataclasses.replace(chosen.repair, model=full_model(chosen.repair.model))
        outcomes = list(self.outcomes)
        outcomes[self.chosen_index] = dataclasses.replace(chosen, repair=repair)
        return SearchResult(tuple(outcomes), self.chosen_index)

    def failures(self) -> list[str]:
        """One phrase per candidate that failed selection: its name and each failed gate's reason."""
        return [f"{o.candidate.name}: " + "; ".join(g.reason for g in o.selection.failed)
                for o in self.outcomes if not o.selection.passed]

    def table(self) -> pd.DataFrame:
        """One row per candidate: name, chosen, strategy, lr, k, steps, rounds, label edits,
        passed (every selection gate), then each gate's measured value and pass flag, and the
        reasons of the failed ones."""
        rows = []
        for index, outcome in enumerate(self.outcomes):
            config = outcome.candidate.config
            row = {"candidate": outcome.candidate.name, "chosen": index == self.chosen_index,
                   "strategy": config.strategy, "lr": config.lr, "k": config.k, "steps": config.steps,
                   "rounds": config.rounds, "label_edits": len(outcome.repair.relabels) if outcome.repair else 0,
                   "passed": outcome.selection.passed}
            for gate in outcome.selection.results:
                row[gate.metric] = gate.after
                row[f"{gate.name}_passed"] = gate.passed
            row["failed_because"] = "; ".join(g.reason for g in outcome.selection.failed)
            rows.append(row)
        return pd.DataFrame(rows)


def selection_split(validation: ExampleTable, fraction: float) -> tuple[ExampleTable, ExampleTable]:
    """Split a validation table into (selection, gate) parts, disjoint, stratified by label.

    Within each label, examples are ordered by the SHA-256 of their `example_id` and the first
    round(fraction * count) go to selection: the same ids always land on the same side, on any
    machine and whatever the table's order. `fraction` in (0, 1); both parts must be non-empty.
    """
    if not 0.0 < fraction < 1.0:
        raise InvalidInput(f"The selection fraction must be in (0, 1); got {fraction!r}.")
    chosen = torch.zeros(len(validation), dtype=torch.bool)
    for label in validation.labels.unique().tolist():
        members = (validation.labels == label).nonzero().flatten().tolist()
        members.sort(key=lambda i: hashlib.sha256(validation.ids[i].encode()).hexdigest())
        chosen[members[: round(fraction * len(members))]] = True
    if not chosen.any() or chosen.all():
        raise InvalidInput(f"A selection fraction of {fraction:g} of {len(validation)} validation examples "
                           "leaves one side empty; log a larger validation split or change the fraction.")
    selection, rest = chosen.nonzero().flatten().numpy(), (~chosen).nonzero().flatten().numpy()
    return validation.subset(selection), validation.subset(rest)


def search_repairs(
    model: nn.Module, train: ExampleTable, flagged: ExampleTable, selection: ExampleTable, num_classes: int,
    thresholds: GateThresholds, candidates: tuple[RepairCandidate, ...], max_steps: int | None = None,
    progress: bool = False,
) -> SearchResult:
    """Repair a copy of `model` with each candidate in order and gate each on `selection`.

    `flagged.labels` are the reviewer's labels; `selection` must be disjoint from `train`,
    `flagged` and the split the final gates use. `max_steps` caps every candidate's steps per
    round (the influence horizon). Each candidate stops once the fix-rate gate's threshold is
    reached. The chosen candidate passes every selection gate with the highest fix rate,
    earliest in order on ties; none when no candidate passes. A candidate whose fine-tuning
    diverges (a NumericalError) fails its `stable_training` gate; the search goes on. `model` is
    never modified.
    `progress`: a progress bar over the candidates on stderr.
    """
    if not candidates:
        raise InvalidInput("The repair search needs at least one candidate.")
    outcomes = []
    for candidate in tqdm(candidates, desc="repair candidates", unit="candidate", disable=not progress):
        config = candidate.config
        steps = config.steps if max_steps is None else max(1, min(config.steps, max_steps))
        config = dataclasses.replace(config, steps=steps, target_fix_rate=thresholds.min_fix_rate or None)
        try:
            repaired = repair_batch(model, train, flagged, config)
        except NumericalError as error:  # this candidate's steps diverged; the others may not
            outcomes.append(CandidateOutcome(dataclasses.replace(candidate, config=config), None,
                                             diverged_report(error, thresholds)))
            continue
        gates = evaluate_prediction_gates(model, repaired.model, flagged, selection, selection, num_classes,
                                          thresholds)
        outcomes.append(CandidateOutcome(dataclasses.replace(candidate, config=config), repaired, gates))
    passing = [i for i, o in enumerate(outcomes) if o.selection.passed]
    chosen = max(passing, key=lambda i: (outcomes[i].selection.result("fix_rate").after, -i)) if passing else None
    return SearchResult(tuple(outcomes), chosen)


def diverged_report(error: NumericalError, thresholds: GateThresholds) -> GateReport:
    """The selection report of a candidate whose fine-tuning diverged: one failed gate,
    `stable_training` (metric `diverged` = 1), whose reason quotes the error."""
    reason = f"training diverged: {error}"
    return GateReport((GateResult("stable_training", "diverged", None, 1.0, 0.0, False, reason),), thresholds)
