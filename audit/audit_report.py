"""What an audit run shows a reviewer, built from `AuditFindings` (plain values; no MLflow here:
registry_hooks logs it): the verdict with the next command, one row per flagged example with
the training examples behind it, one row per suspect training example, and report.html.

    verdict = audit_verdict(findings, run_id, StoreArgs(workdir))
    render_audit_report(folder, findings, verdict)  # report.html (and influence_grid.png for pictures)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from audit.examples import ExampleTable
from audit.findings import AuditFindings
from audit.report_page import Section, example_cell, image_grid, render_page, shows_pictures
from audit.verdict import StoreArgs, Verdict, cli_command

SUSPECTS_TEXT = (
    "One row per training example the audit suspects, with what to do about it. relabel: harmful to the flagged "
    "examples listed and labelled as their wrong prediction; the proposed label says why. remove: harmful, but no "
    "label is plausible. review: check by hand (the model fits its label although it is harmful, or it is unusual "
    "for the model: extreme self-influence). The correction re-scores before it edits anything and reports which "
    "of these it used."
)


def suspects_table(candidates: pd.DataFrame) -> pd.DataFrame:
    """One row per suspect training example (`candidates`: the audit's correction candidates,
    audit.correction.propose_corrections), plain values: train_id,
    action (relabel | remove | review), current_label, proposed_label (NA when none), harms (the
    flagged ids it harms, comma-separated), n_harmed, strongest_score (its most negative influence
    score on them; NaN for self-influence suspects), reason."""
    c = candidates
    return pd.DataFrame({
        "train_id": c["train_id"], "action": c["action"], "current_label": c["current_label"],
        "proposed_label": c["proposed_label"],
        "harms": [", ".join(q) for q in c["evidence_queries"]],
        "n_harmed": [len(q) for q in c["evidence_queries"]],
        "strongest_score": [min(s) if len(s) else float("nan") for s in c["evidence_scores"]],
        "reason": c["reason"],
    })


def audit_verdict(findings: AuditFindings, run_id: str, store: StoreArgs) -> Verdict:
    """The audit's banner: how many suspects it found and the `model-audit correct` command for this run."""
    n, counts = len(findings.flagged), findings.candidates["action"].value_counts()
    command = cli_command("correct", run_id, store=store)
    if len(findings.candidates) == 0:
        return Verdict(False, f"No training example stands out as responsible for the {n} flagged mispredictions.",
                       command, "The correction can still try repairs that reinforce the reviewer's labels.")
    parts = ", ".join(f"{int(counts[a])} {a}" for a in ("relabel", "remove", "review") if a in counts)
    return Verdict(True, f"{n} flagged mispredictions traced to {len(findings.candidates)} suspect training "
                         f"examples ({parts}).", command,
                   "Review the suspects below, then search for a repair behind the validation gates:")


def _pictures(findings: AuditFindings, positions: list[int]) -> tuple:
    """Training examples at `positions` as cells, captioned "id: label"."""
    train = findings.train
    return tuple(example_cell(train, i, f"{train.ids[i]}: {int(train.labels[i])}") for i in positions)


def _suspect_rows(candidates: pd.DataFrame, train: ExampleTable, used: dict[str, str] | None) -> pd.DataFrame:
    table = suspects_table(candidates)
    rows = pd.DataFrame({
        "picture": [example_cell(train, i) for i in train.positions(table["train_id"])],
        "train id": table["train_id"], "action": table["action"], "label": table["current_label"],
        "proposed": table["proposed_label"], "harms flagged": table["harms"],
        "score": table["strongest_score"], "why": table["reason"]})
    if used is not None:  # the correction's page: what it did instead of why (the audit's page says why)
        rows = rows.drop(columns=["score", "why"])
        rows.insert(5, "used by this correction", [used.get(t, "not used") for t in table["train_id"]])
    return rows


def suspects_section(candidates: pd.DataFrame, train: ExampleTable, used: dict[str, str] | None = None) -> Section:
    """The audit's suspects (`candidates`, pictures from `train`) as a report section (id
    `suspects`, table class `suspects`), one row per training example; `used` (train id -> what a
    correction did with it) adds a column for the correction report."""
    return Section("suspects", "Suspect training examples", SUSPECTS_TEXT, _suspect_rows(candidates, train, used),
                   "suspects", empty_text="No suspects: no harmful training example carries the wrong label.")


def flagged_rows(findings: AuditFindings, per_side: int = 3) -> pd.DataFrame:
    """One row per flagged example for the report: its picture, id, the reviewer's label, the
    model's prediction, its `per_side` most harmful and most helpful training examples (pictures
    captioned "id: label") and the suspects among those harmful ones."""
    top = findings.top.head(per_side)
    suspects = set(findings.candidates["train_id"])
    rows = []
    for q, query_id in enumerate(findings.flagged.ids):
        harmful, helpful = top.opponents[q].tolist(), top.proponents[q].tolist()
        rows.append({
            "picture": example_cell(findings.flagged, q, query_id), "flagged id": query_id,
            "reviewer's label": int(findings.flagged.labels[q]), "model predicted": int(findings.predicted[q]),
            "most harmful": _pictures(findings, harmful), "most helpful": _pictures(findings, helpful),
            "suspects": [findings.train.ids[i] for i in harmful if findings.train.ids[i] in suspects]})
    return pd.DataFrame(rows)


def proponent_grid(findings: AuditFindings, per_side: int = 4, max_rows: int = 20):
    """Matplotlib figure: per flagged example (at most `max_rows`), itself captioned with the
    reviewer's label and the model's prediction, then its `per_side` most harmful (-) and most
    helpful (+) training images. For picture inputs only (report_page.shows_pictures)."""
    shown = min(len(findings.flagged), max_rows)
    top = findings.top.queries(slice(0, shown)).head(per_side)
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


def render_audit_report(folder: Path, findings: AuditFindings, verdict: Verdict) -> tuple[Path, ...]:
    """Write `report.html` and, when the examples are pictures, `influence_grid.png` into `folder`;
    returns their paths (report first). Sections (HTML ids): flagged, suspects, self-influence,
    influences."""
    files = ()
    if shows_pictures(findings.flagged) and shows_pictures(findings.train):
        import matplotlib.pyplot as plt

        grid = proponent_grid(findings)
        files = (folder / "influence_grid.png",)
        grid.savefig(files[0], dpi=90, bbox_inches="tight")
        plt.close(grid)
    unusual = findings.self_influence.head(25)
    unusual = unusual.assign(picture=[example_cell(findings.train, i)
                                      for i in findings.train.positions(unusual["train_id"])])
    report = render_page(
        folder / "report.html",
        title=f"Audit of {findings.model_name} version {findings.model_version}",
        verdict=verdict,
        summary=(f"{len(findings.flagged)} flagged mispredictions scored against {len(findings.train)} training "
                 f"examples with influence method {findings.method}."),
        sections=[
            Section("flagged", "Flagged examples and the training examples behind them",
                    "Each row: the flagged example with the reviewer's label and the model's wrong prediction, "
                    "then the training examples pushing hardest toward the wrong prediction (harmful) and toward "
                    "the reviewer's label (helpful), captioned with their id and label.",
                    flagged_rows(findings), "flagged"),
            suspects_section(findings.candidates, findings.train),
            Section("self-influence", "Most unusual training examples (self-influence)",
                    "High self-influence: the model finds the example unusual; mislabelled examples rank high.",
                    unusual[["picture", "train_id", "train_label", "self_influence", "rank"]], "self-influence"),
            Section("influences", "Top influences per flagged example",
                    "Every helpful and harmful training example kept per flagged example (influence.parquet).",
                    findings.influence, "influences"),
        ],
    )
    return (report, *files)
