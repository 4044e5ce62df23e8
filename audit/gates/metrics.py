"""Prediction gates: fix rate, held-out accuracy, per-class recall and canary flips.

Pure functions of predicted labels ([N] int64 tensors, argmax of the logits), so they can be
checked without a model. Each returns one `GateResult` with a one-sentence reason.

The harm gates (held-out accuracy, class recall) compare a drop with a threshold in points. A
held-out split of ~40-50 examples per class cannot resolve 2 points: one changed example is more.
Two optional rules make a drop beyond the threshold fail only on more evidence: `resolution`,
more than that many examples lost net (lost minus gained); `significance`, an exact one-sided
McNemar test on the examples whose correctness changed giving p below it. docs/correction.md
("Gate decisions") has the error rates of each rule, measured on digits.
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


def mcnemar_harm_p(lost: int, gained: int) -> float:
    """One-sided exact McNemar p-value that a change is harmful: P(X >= lost) for X ~
    Binomial(lost + gained, 1/2), i.e. how likely `lost` or more of the changed examples would
    have turned wrong if the change were as likely to help as to harm. 1.0 when nothing changed."""
    n = lost + gained
    return sum(math.comb(n, k) for k in range(lost, n + 1)) / 2**n


def changed_counts(champion_pred: torch.Tensor, candidate_pred: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(lost, gained): examples the champion got right and the candidate gets wrong, and the reverse."""
    champion_right, candidate_right = champion_pred == labels, candidate_pred == labels
    return int((champion_right & ~candidate_right).sum()), int((~champion_right & candidate_right).sum())


def _harm_evidence(lost: int, gained: int, significance: float | None, resolution: int) -> tuple[bool, str]:
    """Whether a drop beyond its threshold counts, and the words for it: more than `resolution`
    examples lost net and, with `significance`, McNemar p below it."""
    counts = lost - gained > resolution
    words = f", {'more' if counts else 'not more'} than {resolution} lost net" if resolution else ""
    if significance is None:
        return counts, words
    p = mcnemar_harm_p(lost, gained)
    comparison = "<" if p < significance else ">="
    return counts and p < significance, words + f", McNemar p={p:.2g} {comparison} {significance:g}"


def accuracy_gate(
    champion_pred: torch.Tensor, candidate_pred: torch.Tensor, labels: torch.Tensor, max_drop_points: float,
    significance: float | None = None, resolution: int = 0,
) -> GateResult:
    """Held-out accuracy as fractions in [0, 1]; `threshold` is before - max_drop_points/100, the
    lowest accuracy accepted outright. Fails when after is below it and more than `resolution`
    examples were lost net and, with `significance`, they are significant harm (see the module
    docstring). Inputs are [H], H > 0."""
    before = float((champion_pred == labels).float().mean())
    after = float((candidate_pred == labels).float().mean())
    lowest = before - max_drop_points / 100.0
    lost, gained = changed_counts(champion_pred, candidate_pred, labels)
    significant, evidence = _harm_evidence(lost, gained, significance, resolution)
    passed = after >= lowest - _SLACK or not significant
    change = (after - before) * 100.0
    verdict = "within" if after >= lowest - _SLACK else "beyond"
    excused = " but not counted as harm" if verdict == "beyond" and passed else ""
    reason = (
        f"held-out accuracy {after:.2%} vs the champion's {before:.2%} ({change:+.2f} points on "
        f"{len(labels)} examples: {lost} lost, {gained} gained{evidence}) is {verdict} the allowed drop "
        f"of {max_drop_points:.2f} points{excused}"
    )
    return GateResult("heldout_accuracy", "heldout_accuracy", before, after, lowest, passed, reason)


def class_recalls(pred: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Recall of each class in `classes` (each must occur in `labels`): [len(classes)] in [0, 1]."""
    return torch.stack([(pred[labels == c] == c).float().mean() for c in classes])


def class_recall_gate(
    champion_pred: torch.Tensor, candidate_pred: torch.Tensor, labels: torch.Tensor, num_classes: int,
    max_drop_points: float, significance: float | None = None, resolution: int = 0,
) -> GateResult:
    """Largest per-class recall drop (champion minus candidate) in points over the classes of
    range(num_classes) present in `labels` (negative when every class improved). A class fails
    when its drop is > max_drop_points, it lost more than `resolution` examples net and, with
    `significance`, they are significant harm; the gate passes when no class fails. The reason names the worst failing
    class, or else the largest drop. Absent classes cannot be measured; the reason names them."""
    present = sorted(set(labels.tolist()) & set(range(num_classes)))
    absent = sorted(set(range(num_classes)) - set(present))
    skipped = f"; classes {absent} are absent from the held-out split and were not checked" if absent else ""
    if not present:
        reason = f"no class of range({num_classes}) occurs in the held-out split, so class recall cannot be measured"
        return GateResult("class_recall", "max_class_recall_drop", None, math.nan, max_drop_points, False, reason)
    recalls_before = class_recalls(champion_pred, labels, present)  # [C']
    recalls_after = class_recalls(candidate_pred, labels, present)  # [C']
    drops = (recalls_before - recalls_after) * 100.0  # [C']
    counts = [changed_counts(champion_pred[labels == c], candidate_pred[labels == c], labels[labels == c])
              for c in present]
    evidence = [_harm_evidence(lost, gained, significance, resolution) for lost, gained in counts]
    failing = [j for j in range(len(present)) if float(drops[j]) > max_drop_points + _SLACK and evidence[j][0]]
    after = float(drops.max())
    passed = not failing
    worst = max(failing, key=lambda j: float(drops[j])) if failing else int(drops.argmax())
    recall_before, recall_after = float(recalls_before[worst]), float(recalls_after[worst])
    drop = float(drops[worst])
    verdict = "within" if drop <= max_drop_points + _SLACK else "more than"
    excused = " but not counted as harm" if verdict == "more than" and passed else ""
    lost, gained = counts[worst]
    reason = (
        f"the largest class recall drop is {drop:.2f} points (class {present[worst]}: "
        f"{recall_before:.1%} -> {recall_after:.1%}, {lost} lost, {gained} gained{evidence[worst][1]}), "
        f"{verdict} the allowed {max_drop_points:.2f}{excused}{skipped}"
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
