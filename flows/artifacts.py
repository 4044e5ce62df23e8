"""What an operator watching Prefect sees of a flow run's outcome: a markdown artifact with the
verdict, the next command and links to the MLflow run and its report, and a table artifact
(Prefect's own artifact API). The content is built in audit/ and registry_hooks/."""

from __future__ import annotations

import json

import pandas as pd
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from audit.verdict import Verdict, verdict_markdown


@task(cache_policy=NO_CACHE)
def publish_outcome(kind: str, title: str, verdict: Verdict, links: dict[str, str], table: pd.DataFrame) -> None:
    """Artifacts `<kind>-outcome` (markdown) and `<kind>-table` (at most 20 rows of `table`) on this
    flow run; `kind` is lowercase letters and dashes (Prefect's key rule)."""
    create_markdown_artifact(key=f"{kind}-outcome", markdown=verdict_markdown(title, verdict, links),
                             description=verdict.headline[:250])
    records = json.loads(table.head(20).to_json(orient="records", default_handler=str))
    create_table_artifact(key=f"{kind}-table", table=records, description=f"{title}: top rows")
