"""report.html of an audit and its image grid, built from `AuditFindings` (plain values; no
MLflow here: registry_hooks logs them)."""

from __future__ import annotations

from pathlib import Path

import torch

from audit.findings import AuditFindings
from audit.influence import top_influences
from audit.report import image_grid, png_data, render_report, section

CANDIDATES_TEXT = (
    "What to change in the training data, one row per training example, with its evidence (the flagged examples "
    "it harms, its scores and its harmfulness ranks among all training examples). relabel: a harmful example "
    "labelled as the wrong prediction, with the proposed label and why (the reviewer's label, or the model's "
    "confident prediction when that is more plausible). remove: harmful and labelled as the wrong prediction, but "
    "no label is plausible. review: check by hand, either because the model fits its label although it is "
    "harmful, or because its self-influence is extreme (unusual for the model, possibly mislabelled). The correct "
    "flow applies relabels only after re-scoring and logs the ones it used."
)


def proponent_grid(findings: AuditFindings, per_side: int = 4, max_rows: int = 20):
    """Matplotlib figure: per flagged example (at most `max_rows`), itself captioned with the
    reviewer's label and the model's prediction, then its `per_side` most harmful (-) and most
    helpful (+) training images."""
    shown = min(len(findings.flagged), max_rows)
    top = top_influences(findings.scores[:shown], per_side)
    flagged, train = findings.flagged, findings.train
    images, captions = [], []
    for q in range(shown):
        images.append(flagged.inputs[q])
        captions.append(f"{int(flagged.labels[q])} (model: {int(findings.predicted[q])})")
        for label, idx in (("-", top.opponents[q]), ("+", top.proponents[q])):
            for i in idx.tolist():
                images.append(train.inputs[i])
                captions.append(f"{label} label {int(train.labels[i])}")
    return image_grid(torch.stack(images), captions, columns=1 + 2 * per_side)


def render_audit_report(folder: Path, findings: AuditFindings) -> tuple[Path, Path]:
    """Write `influence_grid.png` and `report.html` into `folder`; returns (report, grid) paths."""
    import matplotlib.pyplot as plt

    grid = proponent_grid(findings)
    grid_path = folder / "influence_grid.png"
    grid.savefig(grid_path, dpi=90, bbox_inches="tight")
    image = png_data(grid)
    plt.close(grid)
    report = render_report(
        folder / "report.html",
        title=f"Audit of {findings.model_name} version {findings.model_version}",
        summary=(f"{len(findings.flagged)} flagged mispredictions scored against {len(findings.train)} training "
                 f"examples with method `{findings.method}`; {len(findings.candidates)} correction candidates."),
        sections=[
            section("Flagged examples and the training examples behind them",
                    "Each row: the flagged image captioned with the reviewer's label (and the model's wrong "
                    "prediction), then its most harmful (-) and most helpful (+) training examples.", image=image),
            section("Correction candidates", CANDIDATES_TEXT, table=findings.candidates),
            section("Most unusual training examples (self-influence)", table=findings.self_influence.head(25)),
            section("Top influences per flagged example", table=findings.influence),
        ],
    )
    return report, grid_path
