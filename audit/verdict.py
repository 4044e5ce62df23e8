"""What a run concluded and what to do next, in one place for every view of it: the reports'
banner, the Prefect flow run's markdown artifact and the CLI.

    Verdict(passed=True, headline="Every gate passed ...", next_command=cli_command("promote", ...))
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Verdict:
    """A run's outcome: `passed` (the banner's colour: green when the outcome is good news for the
    reviewer), a one-sentence `headline`, optional `detail`, and the exact shell command to run next."""

    passed: bool
    headline: str
    next_command: str
    detail: str = ""


@dataclass(frozen=True)
class StoreArgs:
    """How the CLI reaches a store: its workdir, the MLflow URI when the store is a server, and
    whether the user opted in to loading its pickled models."""

    workdir: Path | str
    tracking_uri: str | None = None
    allow_pickle: bool = False


# The commands that load a model and so need the pickle opt-in when the store's models are pickled.
LOADS_MODELS = ("audit", "correct")


def cli_command(command: str, *args: str, store: StoreArgs) -> str:
    """`model-audit <command> <args>` against `store` (with `--allow-pickle` where the command loads
    a model and the user opted in), quoted for a POSIX shell."""
    words = ["model-audit", command, *args, "--workdir", str(store.workdir)]
    if store.tracking_uri:
        words += ["--tracking-uri", store.tracking_uri]
    if store.allow_pickle and command in LOADS_MODELS:
        words.append("--allow-pickle")
    return shlex.join(words)


def verdict_markdown(title: str, verdict: Verdict, links: dict[str, str]) -> str:
    """Markdown for a Prefect artifact: the title, the verdict, the next command and `links`
    (label -> URL or path). Data text is inserted as plain text inside the markdown."""
    mark = "passed" if verdict.passed else "needs attention"
    lines = [f"# {title}", "", f"**{mark}:** {verdict.headline}"]
    if verdict.detail:
        lines += ["", verdict.detail]
    lines += ["", "Next:", "", "```", verdict.next_command, "```", ""]
    lines += [f"- {label}: {target}" for label, target in links.items()]
    return "\n".join(lines) + "\n"
