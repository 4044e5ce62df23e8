"""docs/byom.md, followed literally: its `python` blocks run in order in one namespace (in a fresh
folder), then its `bash` block runs as written, with the installed `model-audit`, against the
session's Prefect server. The audit must succeed and log the report the page points to."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

DOC = Path(__file__).resolve().parents[2] / "docs" / "byom.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(DOC.read_text()) if lang == language]


def test_the_page_has_the_steps_it_promises():
    assert len(_blocks("python")) == 3
    commands = [line for block in _blocks("bash") for line in block.splitlines() if line.strip()]
    assert commands == ["model-audit audit --model my-sentiment --alias champion --workdir audit-workdir"]


@pytest.mark.slow
def test_a_user_following_the_page_gets_an_audit_of_their_hugging_face_model(prefect_harness, tmp_path,
                                                                             monkeypatch):
    from prefect.settings import PREFECT_API_URL

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "byom"}
    for block in _blocks("python"):
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the documented code, as a user runs it
    flagged = namespace["flagged"]
    assert len(flagged) > 0, "the page's model must mispredict some of its production sentences"

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    bin_dir = Path(sys.executable).parent
    for block in _blocks("bash"):
        for line in filter(str.strip, block.splitlines()):
            argv = shlex.split(line)
            done = subprocess.run([str(bin_dir / argv[0]), *argv[1:]], env=env, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]

    run_id = re.search(r"audit run (\w+): (\d+) flagged", done.stdout)
    assert run_id and int(run_id.group(2)) == len(flagged), done.stdout
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'audit-workdir' / 'mlflow.db'}")
    run = MlflowClient().get_run(run_id.group(1))
    assert run.data.tags["audit.model_name"] == "my-sentiment"
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "audit")}
    assert {"audit/report.html", "audit/influence.parquet", "audit/correction_candidates.parquet"} <= artifacts
    report = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="audit/report.html",
                                                      dst_path=str(tmp_path / "report"))).read_text()
    for sentence in flagged.text:  # the flagged sentences are shown, as text
        assert sentence in report
