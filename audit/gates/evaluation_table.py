"""Evaluation-table gate: a Great Expectations suite over the candidate's per-example outputs.

The table has one row per evaluated example (held-out and flagged): its split, true label
(the reviewer's for flagged rows), predicted label, and summaries of its logits and softmax
probabilities. The suite checks the model's outputs are usable numbers, not only accurate ones.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from audit.expectations import run_suite
from audit.gates.report import GateResult

PROBABILITY_SUM_TOLERANCE = 1e-6
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def evaluation_frame(splits: dict[str, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]]) -> pd.DataFrame:
    """One row per example from `{split: (ids, logits [N, C], true_labels [N])}`.

    Columns: example_id, split, true_label, predicted_label (argmax), num_logits (C),
    logit_min, logit_max (NaN if any logit is NaN), prob_min, prob_max, prob_sum (softmax in
    float64). Non-finite logits give non-finite summaries, which the suite then catches.
    """
    parts = []
    for split, (ids, logits, labels) in splits.items():
        logits64 = logits.detach().to(torch.float64)  # [N, C]
        probs = torch.softmax(logits64, dim=1)  # [N, C]
        parts.append(
            pd.DataFrame(
                {
                    "example_id": list(ids),
                    "split": split,
                    "true_label": labels.numpy().astype(np.int64),
                    "predicted_label": logits64.argmax(dim=1).numpy().astype(np.int64),
                    "num_logits": np.full(len(ids), logits64.shape[1], dtype=np.int64),
                    # torch.amin/amax propagate NaN, so one NaN logit marks the row.
                    "logit_min": logits64.amin(dim=1).numpy(),
                    "logit_max": logits64.amax(dim=1).numpy(),
                    "prob_min": probs.amin(dim=1).numpy(),
                    "prob_max": probs.amax(dim=1).numpy(),
                    "prob_sum": probs.sum(dim=1).numpy(),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def _expectations(gxe, num_classes: int) -> list:
    """The suite, as GX 1.x expectation objects (`gxe`: `great_expectations.expectations`);
    `description` says what each one protects."""
    labels = list(range(num_classes))
    suite = []
    for column in ("logit_min", "logit_max"):
        # Between-checks skip nulls (NaN), so finiteness needs both a null check and a range.
        suite.append(gxe.ExpectColumnValuesToNotBeNull(column=column, description="logits are not NaN"))
        suite.append(
            gxe.ExpectColumnValuesToBeBetween(
                column=column, min_value=-_FLOAT32_MAX, max_value=_FLOAT32_MAX, description="logits are finite"
            )
        )
    for column in ("prob_min", "prob_max"):
        suite.append(gxe.ExpectColumnValuesToNotBeNull(column=column, description="probabilities are numbers"))
        suite.append(
            gxe.ExpectColumnValuesToBeBetween(
                column=column, min_value=0.0, max_value=1.0, description="probabilities lie in [0, 1]"
            )
        )
    suite.append(gxe.ExpectColumnValuesToNotBeNull(column="prob_sum", description="probabilities sum to 1"))
    suite.append(
        gxe.ExpectColumnValuesToBeBetween(
            column="prob_sum", min_value=1.0 - PROBABILITY_SUM_TOLERANCE, max_value=1.0 + PROBABILITY_SUM_TOLERANCE,
            description="probabilities sum to 1",
        )
    )
    suite.append(
        gxe.ExpectColumnValuesToBeInSet(column="num_logits", value_set=[num_classes], description="one logit per class")
    )
    for column in ("predicted_label", "true_label"):
        suite.append(gxe.ExpectColumnValuesToNotBeNull(column=column, description="labels are present"))
        suite.append(
            gxe.ExpectColumnValuesToBeInSet(column=column, value_set=labels, description="labels are in the label set")
        )
    return suite


def validate_evaluation_frame(frame: pd.DataFrame, num_classes: int):
    """Run the suite on `frame`; returns GX's `ExpectationSuiteValidationResult`."""
    return run_suite(frame, "evaluation_table", lambda gxe: _expectations(gxe, num_classes))


def evaluation_table_gate(frame: pd.DataFrame, num_classes: int) -> GateResult:
    """Validate an `evaluation_frame` for a model with `num_classes` outputs. Metric
    `evaluation_table_failed_expectations`: how many expectations failed (threshold 0); the
    reason names each failed one as `type(column)` with its count of offending rows."""
    outcome = validate_evaluation_frame(frame, num_classes)
    failed = []
    for result in outcome.results:
        if result.success:
            continue
        config = result.expectation_config
        name = f"{config.type}({config.kwargs.get('column')})"
        info = result.exception_info or {}
        if info.get("raised_exception"):
            failed.append(f"{name} raised {str(info.get('exception_message')).strip().splitlines()[0]}")
        else:
            failed.append(f"{name} [{config.description}: {result.result.get('unexpected_count')} rows]")
    total = len(outcome.results)
    if failed:
        reason = f"{len(failed)} of {total} expectations failed on {len(frame)} rows: {'; '.join(failed)}"
    else:
        reason = (
            f"all {total} expectations hold on {len(frame)} rows "
            f"(finite logits, probabilities, labels in range({num_classes}))"
        )
    return GateResult(
        "evaluation_table", "evaluation_table_failed_expectations", None, float(len(failed)), 0.0, not failed, reason
    )
