"""What a correction run shows a reviewer, built from plain values: the verdict, the logged
tables, the influence-horizon figure and report.html. No MLflow here; registry_hooks logs it.

    findings = CorrectionFindings(model_name, model_version, n_flagged, search, gates, horizon, ...)
    tables = correction_tables(findings.search)  # candidates / relabels / history DataFrames
    failure_reasons(findings.search, findings.gates)
    render_correction_report(path, findings, tables, train_labels, horizon_plot(horizon, png_path))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from audit.correction.search import SearchResult
from audit.gates import GateReport
from audit.report import png_data, render_report, section


@dataclass(frozen=True)
class CorrectionFindings:
    """Everything report.html says about one correction. `gates` is the chosen candidate's report
    on the gate split (None when no candidate passed selection); `horizon` has one row per step
    count (`steps`, `pearson`, `spearman`); `step_budget` the steps per round it allowed at
    `min_correlation`; `split_sizes` the validation examples that (selected, gated)."""

    model_name: str
    model_version: str
    n_flagged: int
    search: SearchResult
    gates: GateReport | None
    horizon: pd.DataFrame
    step_budget: int
    min_correlation: float
    split_sizes: tuple[int, int]

    @property
    def passed(self) -> bool:
        """Whether the chosen candidate passed every gate (and so is registered)."""
        return self.gates is not None and self.gates.passed


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


def relabel_precision(relabels: dict[str, int], noise: pd.DataFrame) -> float | None:
    """Fraction in [0, 1] of applied relabels that restore a flipped label to its clean value,
    from a label-noise table (example_id, clean_label, noisy_label; the demo logs one). None
    when there are no relabels."""
    if not relabels:
        return None
    clean = dict(zip(noise["example_id"], noise["clean_label"], strict=True))
    noisy = dict(zip(noise["example_id"], noise["noisy_label"], strict=True))
    hits = sum(1 for i, y in relabels.items() if clean[i] != noisy[i] and clean[i] == y)
    return hits / len(relabels)


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


def render_correction_report(path: Path, findings: CorrectionFindings, tables: dict[str, pd.DataFrame],
                             train_labels: dict[str, int], horizon_png: str) -> Path:
    """Write report.html of a correction run to `path`: the verdict, the repair candidates tried,
    every gate of the chosen one, the influence horizon and the step budget taken from it, the
    rounds, and the label edits (with each edited example's current label from `train_labels`).
    `tables` are `correction_tables(findings.search)` (left unchanged); `horizon_png` is the
    horizon figure as base64 PNG. Returns `path`."""
    gates, chosen = findings.gates, findings.search.chosen
    if findings.passed:
        verdict = f"Every gate passed: candidate `{chosen.candidate.name}` is registered as challenger."
    else:
        verdict = "Not registered: " + "; ".join(failure_reasons(findings.search, gates)) + "."
    edits = tables["relabels"].copy()
    if len(edits):
        edits.insert(1, "current_label", [train_labels[i] for i in edits["train_id"]])
    selected, gated = findings.split_sizes
    sections = [section(
        "Repair candidates",
        f"Each candidate repaired a copy of the model and was gated on a selection split of {selected} validation "
        f"examples; the gates below use the other {gated}, which no candidate was chosen on. The chosen "
        "candidate passes every selection gate with the highest fix rate (earliest on ties).",
        table=tables["candidates"])]
    if gates is not None:
        gate_table = pd.DataFrame([{"gate": g.name, "before": g.before, "after": g.after, "threshold": g.threshold,
                                    "passed": g.passed, "reason": g.reason} for g in gates.results])
        sections.append(section("Gates", f"Champion (before) vs candidate `{chosen.candidate.name}` (after) on the "
                                         "flagged batch and on the gate split of the validation data.",
                                table=gate_table))
    summary = f"{len(findings.search.outcomes)} repair candidate(s) tried on {findings.n_flagged} flagged examples. "
    if chosen is not None:
        config, repaired = chosen.candidate.config, chosen.repair
        summary += (f"Chosen: `{chosen.candidate.name}` (strategy `{config.strategy}`, influence method "
                    f"`{config.method}`): {repaired.rounds} round(s), {repaired.steps_taken} fine-tuning steps, "
                    f"{len(repaired.relabels)} label edits. ")
    return render_report(
        path, title=f"Correction of {findings.model_name} version {findings.model_version}",
        summary=summary + verdict,
        sections=sections + [
            section("Influence horizon",
                    f"For each sampled flagged example, training subsets were fine-tuned on for s steps and the "
                    f"actual change of its loss compared with the change influence predicted. The repair takes "
                    f"at most {findings.step_budget} steps between re-scorings: the longest horizon whose Pearson "
                    f"correlation stays at or above {findings.min_correlation}.", table=findings.horizon,
                    image=horizon_png),
            section("Rounds of the chosen candidate", "Each round re-scores the still-wrong flagged examples and "
                    "fine-tunes on the training examples it selects (plus a replay sample).", table=tables["history"]),
            section("Label edits of the chosen candidate", table=edits),
        ],
    )


def correction_metrics(findings: CorrectionFindings, label_noise: pd.DataFrame | None) -> dict[str, float]:
    """The correction run's metrics: the chosen candidate's gate metrics (GateReport.metrics), the
    search's `candidates_tried` / `candidates_passed_selection`, `step_budget`, and for the
    chosen repair `steps_taken`, `rounds`, `n_relabels` and, given a label-noise table,
    `relabel_precision`."""
    outcomes = findings.search.outcomes
    metrics = findings.gates.metrics() if findings.gates else {}
    metrics.update({"candidates_tried": len(outcomes), "step_budget": findings.step_budget,
                    "candidates_passed_selection": sum(o.selection.passed for o in outcomes)})
    chosen = findings.search.chosen
    if chosen is not None:
        repaired = chosen.repair
        if label_noise is not None and repaired.relabels:
            metrics["relabel_precision"] = relabel_precision(repaired.relabels, label_noise)
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
