"""Prediction gates: fix rate, held-out accuracy, per-class recall and canary flips.

Pure functions of predicted labels ([N] int64 tensors, argmax of the logits), so they can be
checked without a model. Each returns one `GateResult` with a one-sentence reason.
"""

from __future__ import annotations

import math

import torch

from audit.gates.report import GateResult

# Absorbs float rounding in "before - drop/100" so a change exactly at the limit passes.
_SLACK = 1e-9


def fix_rate_gate(
    champion_pred: torch.Tensor, candidate_pred: torch.Tensor, reviewer_labels: torch.Tensor, min_fix_rate: float
) -> GateResult:
    """Fraction of flagged examples predicted as the reviewer's label: before (champion, normally
    0) and after (candidate). Passes when after >= min_fix_rate. Inputs are [F] labels, F > 0."""
    n = len(reviewer_labels)
    fixed = int((candidate_pred == reviewer_labels).sum())  # [F] -> count
    before = float((champion_pred == reviewer_labels).float().mean())
    after = fixed / n
    passed = after >= min_fix_rate - _SLACK
    verdict = "meets" if passed else "is below"
    reason = (
        f"fix rate {after:.2f} ({fixed} of {n} flagged examples now predicted as the reviewer's label, "
        f"champion {before:.2f}) {verdict} the required {min_fix_rate:.2f}"
    )
    return GateResult("fix_rate", "fix_rate", before, after, min_fix_rate, passed, reason)


def accuracy_gate(
    champion_pred: torch.Tensor, candidate_pred: torch.Tensor, labels: torch.Tensor, max_drop_points: float
) -> GateResult:
    """Held-out accuracy as fractions in [0, 1]. Passes when after >= before - max_drop_points/100;
    `threshold` is that lowest accepted accuracy. Inputs are [H] labels, H > 0."""
    before = float((champion_pred == labels).float().mean())
    after = float((candidate_pred == labels).float().mean())
    lowest = before - max_drop_points / 100.0
    passed = after >= lowest - _SLACK
    change = (after - before) * 100.0
    verdict = "within" if passed else "beyond"
    reason = (
        f"held-out accuracy {after:.2%} vs the champion's {before:.2%} ({change:+.2f} points on "
        f"{len(labels)} examples) is {verdict} the allowed drop of {max_drop_points:.2f} points"
    )
    return GateResult("heldout_accuracy", "heldout_accuracy", before, after, lowest, passed, reason)


def class_recalls(pred: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Recall of each class in `classes` (each must occur in `labels`): [len(classes)] in [0, 1]."""
    return torch.stack([(pred[labels == c] == c).float().mean() for c in classes])


def class_recall_gate(
    champion_pred: torch.Tensor, candidate_pred: torch.Tensor, labels: torch.Tensor, num_classes: int,
    max_drop_points: float,
) -> GateResult:
    """Largest per-class recall drop (champion minus candidate) in points over the classes of
    range(num_classes) present in `labels` (negative when every class improved). Passes when it
    is <= max_drop_points. Absent classes cannot be measured; the reason names them."""
    present = sorted(set(labels.tolist()) & set(range(num_classes)))
    absent = sorted(set(range(num_classes)) - set(present))
    skipped = f"; classes {absent} are absent from the held-out split and were not checked" if absent else ""
    if not present:
        reason = f"no class of range({num_classes}) occurs in the held-out split, so class recall cannot be measured"
        return GateResult("class_recall", "max_class_recall_drop", None, math.nan, max_drop_points, False, reason)
    recalls_before = class_recalls(champion_pred, labels, present)  # [C']
    recalls_after = class_recalls(candidate_pred, labels, present)  # [C']
    drops = (recalls_before - recalls_after) * 100.0
    worst = int(drops.argmax())
    after = float(drops[worst])
    passed = after <= max_drop_points + _SLACK
    recall_before, recall_after = float(recalls_before[worst]), float(recalls_after[worst])
    verdict = "within" if passed else "more than"
    reason = (
        f"the largest class recall drop is {after:.2f} points (class {present[worst]}: "
        f"{recall_before:.1%} -> {recall_after:.1%}), {verdict} the allowed {max_drop_points:.2f}{skipped}"
    )
    return GateResult("class_recall", "max_class_recall_drop", None, after, max_drop_points, passed, reason)


def canary_gate(
    champion_pred: torch.Tensor, candidate_pred: torch.Tensor, labels: torch.Tensor, max_flip_rate: float
) -> GateResult:
    """Flip rate on the canary inputs the champion predicts correctly: the fraction whose
    candidate prediction differs. Canary rows the champion gets wrong are left out. Passes when
    the rate is <= max_flip_rate; fails when no canary row is predicted correctly."""
    correct = champion_pred == labels  # [K] bool
    kept = int(correct.sum())
    if kept == 0:
        reason = (
            f"none of the {len(labels)} canary inputs is predicted correctly by the champion, "
            "so prediction flips cannot be measured; pass a canary sample the champion gets right"
        )
        return GateResult("canary_flips", "canary_flip_rate", None, math.nan, max_flip_rate, False, reason)
    flips = int((candidate_pred[correct] != champion_pred[correct]).sum())
    after = flips / kept
    passed = after <= max_flip_rate + _SLACK
    verdict = "within" if passed else "more than"
    reason = (
        f"{flips} of {kept} canary inputs the champion predicts correctly changed prediction ({after:.2%}), "
        f"{verdict} the allowed {max_flip_rate:.2%}"
    )
    return GateResult("canary_flips", "canary_flip_rate", None, after, max_flip_rate, passed, reason)
