"""What a correction run shows a reviewer, built from plain values: the verdict with the next
command, the logged tables, the gates with the evidence behind them, the label edits against the
audit's proposals, the influence-horizon figure and report.html. No MLflow here; registry_hooks
logs it.

    findings = CorrectionFindings(...)
    verdict = correction_verdict(findings, StoreArgs(workdir))
    report, plot = render_correction_report(folder, findings, verdict)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from audit.audit_report import suspects_section
from audit.correction.evidence import edits_touching
from audit.correction.search import CANDIDATES_BY_NAME, SearchResult
from audit.examples import ExampleTable
from audit.gates import GateReport
from audit.report_page import Section, example_cell, png_data, render_page
from audit.verdict import StoreArgs, Verdict, cli_command


@dataclass(frozen=True)
class CorrectionFindings:
    """Everything report.html says about one correction of the audit `audit_run_id`.

    `gates` is the chosen candidate's report on the gate split (None when no candidate passed
    selection); `changes` the gate-split examples whose prediction the chosen repair changed
    (audit.correction.evidence.prediction_changes; None without a chosen candidate); `horizon`
    one row per step count (`steps`, `pearson`, `spearman`); `step_budget` the steps per round
    it allowed at `min_correlation`; `split_sizes` the validation examples (selected, gated);
    `train` / `gate_split` give the pictures; `audit_candidates` and `audit_method` are what the
    audit proposed and scored with.
    """

    model_name: str
    model_version: str
    audit_run_id: str
    n_flagged: int
    search: SearchResult
    gates: GateReport | None
    horizon: pd.DataFrame
    step_budget: int
    min_correlation: float
    split_sizes: tuple[int, int]
    train: ExampleTable
    gate_split: ExampleTable
    audit_candidates: pd.DataFrame
    audit_method: str
    changes: pd.DataFrame | None = None

    @property
    def passed(self) -> bool:
        """Whether the chosen candidate passed every gate (and so is registered)."""
        return self.gates is not None and self.gates.passed

    @cached_property
    def tables(self) -> dict[str, pd.DataFrame]:
        """`correction_tables(self.search)`, built once for the report, the log and the Prefect table."""
        return correction_tables(self.search)

    @property
    def relabels(self) -> dict[str, int]:
        """The chosen repair's label edits (train id -> proposed label); empty without one."""
        chosen = self.search.chosen
        return dict(chosen.repair.relabels) if chosen else {}


def failure_reasons(search: SearchResult, gates: GateReport | None) -> list[str]:
    """Why nothing is registered: the chosen candidate's failed gates, or, when no candidate
    passed selection, one phrase naming each candidate's failed gates. Empty when all passed."""
    if gates is None:
        return ["no repair candidate passed the gates on the selection split (" + " | ".join(search.failures()) + ")"]
    return [g.reason for g in gates.failed]


def correction_tables(search: SearchResult) -> dict[str, pd.DataFrame]:
    """The logged tables: `candidates` (every candidate tried) and the chosen one's `relabels`
    (train_id, proposed_label) and `history` (one row per round); both empty when none was chosen."""
    repaired = search.chosen.repair if search.chosen else None
    relabels = repaired.relabels if repaired else {}
    return {"candidates": search.table(),
            "relabels": pd.DataFrame({"train_id": list(relabels), "proposed_label": list(relabels.values())}),
            "history": pd.DataFrame(list(repaired.history) if repaired else [])}


def horizon_plot(horizon: pd.DataFrame, path: Path) -> str:
    """Plot Pearson and Spearman of predicted vs actual loss change over fine-tuning steps; write
    it to `path` as PNG and return it as base64 PNG for an inline image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(horizon["steps"], horizon["pearson"], marker="o", label="Pearson")
    ax.plot(horizon["steps"], horizon["spearman"], marker="s", label="Spearman")
    ax.set(xscale="log", xlabel="fine-tuning steps", ylabel="correlation (predicted vs actual loss change)",
           ylim=(-1, 1), title="How far the influence estimate holds")
    ax.set_xticks(list(horizon["steps"]), [str(v) for v in horizon["steps"]])
    ax.legend()
    fig.savefig(path, format="png", bbox_inches="tight", dpi=90)
    image = png_data(fig)
    plt.close(fig)
    return image


def correction_verdict(findings: CorrectionFindings, store: StoreArgs) -> Verdict:
    """The correction's banner: registered (next: promote it) or why not (next: the candidates not
    tried yet, or, when every named candidate was tried, a new audit with more flagged examples)."""
    chosen = findings.search.chosen
    if findings.passed:
        return Verdict(True, f"Every gate passed: candidate {chosen.candidate.name} is registered as @challenger of "
                             f"{findings.model_name} (a repair of version {findings.model_version}).",
                       cli_command("promote", "--model", findings.model_name, store=store),
                       "Check the gates and the label edits below; then promote the challenger to champion:")
    headline = "Not registered: " + "; ".join(failure_reasons(findings.search, findings.gates)) + "."
    tried = {o.candidate.name for o in findings.search.outcomes}
    untried = [name for name in CANDIDATES_BY_NAME if name not in tried]
    if untried:
        return Verdict(False, headline, cli_command("correct", findings.audit_run_id, "--candidates",
                                                    ",".join(untried), store=store),
                       "The gate evidence below shows what broke. To try the repair candidates not tried yet:")
    return Verdict(False, headline, cli_command("audit", "--model", findings.model_name, store=store),
                   "Every repair candidate was tried. Flag more examples of the same mistake into the inbox and "
                   "audit again:")


def _used_by_correction(findings: CorrectionFindings) -> dict[str, str]:
    chosen = findings.search.chosen
    if chosen is None:
        return {}
    used = {t: "fine-tuned on" for t in chosen.repair.selected_ids}
    used.update({t: f"relabelled to {y}" for t, y in chosen.repair.relabels.items()})
    return used


def _edit_rows(findings: CorrectionFindings) -> pd.DataFrame:
    """One row per label edit: picture, id, label before and after, and what the audit proposed."""
    relabels, train = findings.relabels, findings.train
    audit = findings.audit_candidates.set_index("train_id") if len(findings.audit_candidates) else None
    rows = []
    for i, (t, y) in zip(train.positions(list(relabels)), relabels.items(), strict=True):
        proposal = audit.loc[t] if audit is not None and t in audit.index else None
        audit_action = proposal["action"] if proposal is not None else "not a suspect"
        audit_label = proposal["proposed_label"] if proposal is not None else None
        rows.append({"picture": example_cell(train, i), "train id": t, "label": int(train.labels[i]),
                     "relabelled to": y, "audit proposed": audit_action,
                     "audit's label": None if audit_label is None or pd.isna(audit_label) else int(audit_label),
                     "as the audit proposed": audit_action == "relabel" and audit_label == y})
    return pd.DataFrame(rows, columns=["picture", "train id", "label", "relabelled to", "audit proposed",
                                       "audit's label", "as the audit proposed"])


def _evidence_rows(findings: CorrectionFindings) -> pd.DataFrame:
    """One row per gate-split example whose prediction the repair changed, lost ones first, with
    its picture and the edits that touched its class."""
    changes = findings.changes
    if changes is None or len(changes) == 0:
        return pd.DataFrame()
    current = {t: int(findings.train.labels[i])
               for t, i in zip(findings.relabels, findings.train.positions(list(findings.relabels)), strict=True)}
    order = changes.assign(_o=changes["change"].map({"lost": 0, "changed": 1, "gained": 2})).sort_values(
        ["_o", "label"], kind="stable")
    positions = findings.gate_split.positions(order["example_id"])
    return pd.DataFrame({
        "picture": [example_cell(findings.gate_split, i) for i in positions],
        "validation id": order["example_id"].tolist(), "label": order["label"].tolist(),
        "champion predicted": order["before"].tolist(), "repair predicted": order["after"].tolist(),
        "change": order["change"].tolist(),
        "edits touching its class": [edits_touching(findings.relabels, current, y) for y in order["label"]]})


def _evidence_text(findings: CorrectionFindings) -> str:
    lost = findings.changes[findings.changes["change"] == "lost"] if findings.changes is not None else None
    failed = [g.reason for g in findings.gates.failed] if findings.gates else []
    head = ("The failed gates: " + " ".join(failed) + " ") if failed else ""
    if lost is None or len(lost) == 0:
        return head + "No gate-split example that the champion predicted correctly changed its prediction."
    per_class = lost.groupby("label").size()
    classes = ", ".join(f"class {int(c)}: {int(n)}" for c, n in per_class.items())
    return (head + f"Examples the champion got right and the repair gets wrong, by class ({classes}); each row "
            "lists the label edits that moved a training example into or out of its class.")


def _candidate_rows(candidates: pd.DataFrame) -> pd.DataFrame:
    """The candidates' outcomes for the page (their configuration is in the logged table)."""
    table = candidates.copy()
    table["candidate"] = [f"{n} (chosen)" if chosen else n for n, chosen in zip(table["candidate"], table["chosen"],
                                                                             strict=True)]
    keep = [c for c in table.columns if not c.endswith("_passed")
            and c not in ("chosen", "strategy", "lr", "k", "steps", "rounds")]
    return table[keep]


def render_correction_report(folder: Path, findings: CorrectionFindings, verdict: Verdict) -> tuple[Path, Path]:
    """Write `report.html` and `influence_horizon.png` of a correction run into `folder`; returns
    (report, plot). Sections (HTML ids): gates, gate-evidence, candidates, edits, suspects,
    horizon, rounds (gates and gate-evidence only when a candidate passed selection)."""
    gates, chosen = findings.gates, findings.search.chosen
    selected, gated = findings.split_sizes
    tables = findings.tables
    sections = []
    if gates is not None:
        gate_table = pd.DataFrame([{"gate": g.name, "before": g.before, "after": g.after, "threshold": g.threshold,
                                    "passed": g.passed, "why": g.reason} for g in gates.results])
        sections += [
            Section("gates", "Gates", f"Champion (before) vs candidate {chosen.candidate.name} (after) on the "
                    f"flagged batch and on {gated} validation examples no candidate was chosen on.", gate_table,
                    "gates"),
            Section("gate-evidence", "What changed on the validation examples", _evidence_text(findings),
                    _evidence_rows(findings), "gate-evidence",
                    empty_text="The repair changed no prediction on the gate split."),
        ]
    edits = _edit_rows(findings)
    differ = int((~edits["as the audit proposed"]).sum()) if len(edits) else 0
    sections += [
        Section("candidates", "Repair candidates",
                f"Each candidate repaired a copy of the model and was gated on a selection split of {selected} "
                "validation examples. The chosen one passes every selection gate with the highest fix rate "
                "(earliest on ties).", _candidate_rows(tables["candidates"]), "candidates"),
        Section("edits", "Label edits of the chosen candidate",
                "Each edit with what the audit proposed for that example"
                + (f"; {differ} of {len(edits)} differ from the audit's proposals (the correction re-scores "
                   "with the repaired model before each round, so it can pick other examples)." if differ else "."),
                edits, "edits", empty_text="No label edits."),
        suspects_section(findings.audit_candidates, findings.train, _used_by_correction(findings)),
    ]
    plot = folder / "influence_horizon.png"
    sections += [
        Section("horizon", "Influence horizon",
                f"For each sampled flagged example, training subsets were fine-tuned on for s steps and the actual "
                f"change of its loss compared with the change influence predicted. The repair takes at most "
                f"{findings.step_budget} steps between re-scorings: the longest horizon whose Pearson correlation "
                f"stays at or above {findings.min_correlation}.", findings.horizon, "horizon",
                image=horizon_plot(findings.horizon, plot)),
        Section("rounds", "Rounds of the chosen candidate", "Each round re-scores the still-wrong flagged examples "
                "and fine-tunes on the training examples it selects (plus a replay sample).", tables["history"],
                "rounds", empty_text="No candidate was chosen."),
    ]
    summary = f"{len(findings.search.outcomes)} repair candidate(s) tried on {findings.n_flagged} flagged examples"
    if chosen is not None:
        config, repaired = chosen.candidate.config, chosen.repair
        summary += (f"; chosen: {chosen.candidate.name} (strategy {config.strategy}): {repaired.rounds} round(s), "
                    f"{repaired.steps_taken} fine-tuning steps, {len(repaired.relabels)} label edits. It re-scored "
                    f"with influence method {config.method}; the audit used {findings.audit_method}")
    report = render_page(folder / "report.html", f"Correction of {findings.model_name} version "
                         f"{findings.model_version}", verdict, summary + ".", sections)
    return report, plot


def correction_metrics(findings: CorrectionFindings) -> dict[str, float]:
    """The correction run's metrics: the chosen candidate's gate metrics (GateReport.metrics), the
    search's `candidates_tried` / `candidates_passed_selection`, `step_budget`, and for the
    chosen repair `steps_taken`, `rounds` and `n_relabels`."""
    outcomes = findings.search.outcomes
    metrics = findings.gates.metrics() if findings.gates else {}
    metrics.update({"candidates_tried": len(outcomes), "step_budget": findings.step_budget,
                    "candidates_passed_selection": sum(o.selection.passed for o in outcomes)})
    chosen = findings.search.chosen
    if chosen is not None:
        repaired = chosen.repair
        metrics.update({"steps_taken": repaired.steps_taken, "rounds": repaired.rounds,
                        "n_relabels": len(repaired.relabels)})
    return metrics


def correction_params(findings: CorrectionFindings, selection_fraction: float) -> dict[str, object]:
    """The correction run's params: `correction.candidate` (or "none"), `correction.selection_fraction`
    and the chosen candidate's config as `correction.<field>`."""
    chosen = findings.search.chosen
    params: dict[str, object] = {"correction.candidate": chosen.candidate.name if chosen else "none",
                                 "correction.selection_fraction": selection_fraction}
    if chosen is not None:
        params.update({f"correction.{k}": v for k, v in vars(chosen.candidate.config).items()})
    return params
