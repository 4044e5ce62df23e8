"""Correction settings and results: `CorrectionConfig` (validated) and `RepairResult`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from audit.errors import InvalidInput

STRATEGIES = ("reinforce", "relabel", "unlearn")
OPTIMIZERS = ("sgd", "adam")
MAX_LR = 1e30


def rescoring_methods() -> tuple[str, ...]:
    """What `CorrectionConfig.method` accepts: every registered influence method that needs no
    training checkpoints (a repair has none), and the gradient index."""
    from audit.correction.rescoring import INDEX
    from audit.influence import registry

    return (*(m.name for m in registry.methods() if not m.needs_checkpoints), INDEX)


@dataclass(frozen=True)
class CorrectionConfig:
    """How to repair a model with a few fine-tuning steps on influential training examples.

    Defaults are the batch-mode values bench/correction.py measured to work on the digits CNN
    (see bench/RESULTS.md); `PER_QUERY_CONFIG` holds the per-query ones.
    """

    strategy: str = "relabel"  # reinforce | relabel | unlearn
    # influence method the rounds re-score with: a registered audit.influence method without
    # checkpoints (its curvature fitted once on the input model), or "index" (a gradient index of
    # the training set built once for the input model); see audit.correction.rescoring
    method: str = "graddot"
    k: int = 3  # training examples selected per still-wrong query and round
    steps: int = 10  # fine-tuning steps per round
    lr: float = 4e-4  # fine-tuning learning rate (Adam: 3e-4 fixed less, 5e-4 cost held-out accuracy)
    replay_size: int = 1000  # training examples the model fits, mixed into every step; 0 = none
    rounds: int = 3  # select -> fine-tune -> re-score rounds (re-scoring only the still-wrong queries)
    seed: int = 0  # seeds replay sampling and any random choice
    target_fix_rate: float | None = None  # stop after the round that reaches this fixed fraction
    optimizer: str = "adam"  # sgd | adam (fresh state for every round)
    ascent_bound: float = 2.3  # unlearn: per-example loss above which ascent stops (~ log 10)
    min_confidence: float = 0.5  # relabel: model probability needed to prefer its own prediction
    reinforce_k: int = 5  # relabel: also descend on each still-wrong query's most helpful examples
    soft_replay: bool = False  # replay toward the input model's probabilities instead of the labels

    def __post_init__(self) -> None:
        problems = []
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.method not in rescoring_methods():
            problems.append(f"method must be one of {rescoring_methods()}, got {self.method!r}")
        for name, low, high in (("k", 1, 10_000), ("steps", 1, 10_000), ("rounds", 1, 100),
                                ("replay_size", 0, 1_000_000), ("reinforce_k", 0, 10_000)):
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                problems.append(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        # a learning rate that makes the steps diverge fails that candidate ("training diverged"),
        # not the correction; the bound only keeps Adam's step size (lr / 0.1) inside float32
        if not (isinstance(self.lr, (int, float)) and 0.0 < self.lr <= MAX_LR):
            problems.append(f"lr must be a positive number at most {MAX_LR:g}, got {self.lr!r}")
        if not 0.0 < self.ascent_bound <= 100.0:
            problems.append(f"ascent_bound must be in (0, 100], got {self.ascent_bound!r}")
        if not 0.0 <= self.min_confidence <= 1.0:
            problems.append(f"min_confidence must be in [0, 1], got {self.min_confidence!r}")
        if self.target_fix_rate is not None and not 0.0 < self.target_fix_rate <= 1.0:
            problems.append(f"target_fix_rate must be None or in (0, 1], got {self.target_fix_rate!r}")
        if problems:
            raise InvalidInput("Invalid CorrectionConfig: " + "; ".join(problems) + ".")


@dataclass(frozen=True)
class RepairResult:
    """A repaired copy of the model and how it was obtained (the input model is never modified).

    `history` has one dict per round: `round`, `fixed_fraction` (flagged examples predicted as
    the reviewer's label after the round), `still_wrong`, `selected`, `relabels`, `steps`,
    `loss_start`/`loss_end` (fine-tuning loss on the round's batch) - nothing held-out.
    `model`, `steps_taken`, `selected_ids` and `relabels` describe the best round (highest fixed
    fraction); `rounds` counts every round run.
    """

    model: nn.Module
    steps_taken: int
    rounds: int
    selected_ids: tuple[str, ...]
    relabels: dict[str, int]
    history: tuple[dict, ...]
