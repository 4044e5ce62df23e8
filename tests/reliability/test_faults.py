"""Faults injected into real `model-audit audit` processes (docs/reliability.md, "Faults"): two
started on one inbox at once, and one SIGKILLed right after it claimed the batch or while it
logged the audit run. Whatever the exact moment, the invariant is the same once the next audit
has recovered the claim: the batch was audited by exactly one FINISHED run, archived once under
it, and nothing is left RUNNING, in the inbox or in a claim."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # `model-audit audit` processes
AUDIT_TIMEOUT_S = 300
POLL_S = 0.02  # the logging stage lasts about a second: poll often to kill inside it


def start_audit(workdir: Path) -> subprocess.Popen:
    """`model-audit audit` on `workdir` (its own process group), on the test Prefect API."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.Popen([str(Path(sys.executable).parent / "model-audit"), "audit", "--workdir", str(workdir),
                             "--model", "m", "--allow-pickle", "--method", "graddot"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_when(process: subprocess.Popen, moment, what: str) -> None:
    """SIGKILL the process group as soon as `moment()` holds (polled every POLL_S)."""
    deadline = time.monotonic() + AUDIT_TIMEOUT_S
    while not moment():
        assert process.poll() is None, f"the audit ended before {what}:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def audit_runs(workdir: Path) -> dict[str, str]:
    """{run id: status} of the store's audit runs."""
    from mlflow.tracking import MlflowClient

    from registry_hooks.store import tracking_uri

    client = MlflowClient(tracking_uri(workdir))
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id: r.info.status
            for r in client.search_runs(experiments, filter_string="tags.`audit.kind` = 'audit'")}


def recover_and_audit(workdir: Path) -> None:
    """The next audit, started after the claim's timeout passed (the claims are backdated an hour)."""
    from audit.errors import EmptyInbox
    from flows.audit_flow import audit
    from flows.settings import AuditSettings, StoreSettings

    hour_ago = time.time() - 3600
    for claim in (workdir / "claims").glob("*"):
        os.utime(claim, (hour_ago, hour_ago))
    try:
        audit(StoreSettings(workdir=workdir, allow_pickle=True), AuditSettings(model_name="m", method="graddot"))
    except EmptyInbox:  # the killed run had finished logging: recovery archived its batch, nothing left
        pass


def assert_audited_once(workdir: Path, batch: str) -> None:
    runs = audit_runs(workdir)
    finished = [run for run, status in runs.items() if status == "FINISHED"]
    assert len(finished) == 1 and "RUNNING" not in runs.values(), runs
    assert [p.parent.name for p in (workdir / "processed").rglob(batch)] == finished
    assert not any((workdir / "inbox").iterdir())
    assert not (workdir / "claims").exists() or not any((workdir / "claims").rglob("*.parquet"))


@pytest.fixture
def inbox_batch(small_champion):
    from audit.flagged import write_batch

    workdir, frame = small_champion
    write_batch(frame, workdir / "inbox" / "batch.parquet")
    return workdir


def test_two_audits_started_together_audit_the_batch_once(prefect_harness, inbox_batch):
    first, second = start_audit(inbox_batch), start_audit(inbox_batch)
    outputs = [p.communicate(timeout=AUDIT_TIMEOUT_S)[0] for p in (first, second)]
    codes = sorted(p.returncode for p in (first, second))
    assert codes == [0, 2], outputs
    loser = outputs[[first.returncode, second.returncode].index(2)]
    assert "holds no Parquet or CSV flagged batch" in loser and "Traceback" not in "".join(outputs), outputs
    assert_audited_once(inbox_batch, "batch.parquet")


def test_an_audit_killed_right_after_its_claim_is_audited_once_later(prefect_harness, inbox_batch):
    process = start_audit(inbox_batch)
    kill_when(process, lambda: any((inbox_batch / "claims").glob("*/batch.parquet")), "the claim")
    assert not any((inbox_batch / "inbox").iterdir()) and audit_runs(inbox_batch) == {}
    recover_and_audit(inbox_batch)
    assert_audited_once(inbox_batch, "batch.parquet")


def test_an_audit_killed_while_logging_its_run_is_audited_once_later(prefect_harness, inbox_batch):
    process = start_audit(inbox_batch)
    kill_when(process, lambda: any((inbox_batch / "mlruns").glob("*/artifacts/audit/*")), "the first audit artifact")
    killed = audit_runs(inbox_batch)
    assert len(killed) == 1, killed  # RUNNING, or FINISHED if it got to the end of logging before the kill
    recover_and_audit(inbox_batch)
    assert_audited_once(inbox_batch, "batch.parquet")
    (status,) = (s for r, s in audit_runs(inbox_batch).items() if r in killed)
    assert status in ("FAILED", "FINISHED")  # a half-logged run is marked FAILED, never left RUNNING

