"""deploy/prefect.yaml deploys, through Prefect's own CLI, the deployment `model-audit serve` serves:
same flow, name, parameters and schedule, on the `model-audit` work pool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.service import DEPLOYMENT, FLOW, ServiceSettings

ROOT = Path(__file__).resolve().parents[2]


def prefect_cli(*args: str) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow  # runs Prefect's CLI as subprocesses
def test_prefect_yaml_deploys_the_served_deployment(prefect_harness):
    from prefect import get_client

    (spec,) = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]
    assert spec["parameters"] == ServiceSettings().parameters()

    created = prefect_cli("work-pool", "create", "model-audit", "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect_cli("deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    with get_client(sync_client=True) as client:
        stored = client.read_deployment_by_name(f"{FLOW}/{DEPLOYMENT}")
    assert stored.parameters == ServiceSettings().parameters()
    assert [s.schedule.cron for s in stored.schedules] == [ServiceSettings().cron]
    assert stored.work_pool_name == "model-audit"
    assert stored.global_concurrency_limit is not None and stored.global_concurrency_limit.limit == 1
    assert stored.entrypoint == "flows/pipeline.py:audit_and_correct"
