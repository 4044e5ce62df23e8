"""The inbox's claims on a real filesystem: each file is claimed exactly once however many runs
race for it; stale claims are found and handed back."""

import os
import threading
import time

from audit.inbox import Recovery, claim_batch, claim_digest, move_files, recovery_for, requeue, stale_claims
from audit.modalities import Pixels


def _inbox(tmp_path, n):
    inbox = tmp_path / "inbox"
    inbox.mkdir(parents=True)
    for i in range(n):
        (inbox / f"batch-{i:02d}.parquet").write_bytes(b"x")
    return inbox


def test_racing_runs_claim_each_file_exactly_once(tmp_path):
    inbox = _inbox(tmp_path, 40)
    results: dict[str, list] = {}
    start = threading.Barrier(8)

    def run(name):
        start.wait()
        results[name] = claim_batch(inbox, tmp_path / "claims", name)

    threads = [threading.Thread(target=run, args=(f"run-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [p.name for files in results.values() for p in files]
    assert sorted(claimed) == [f"batch-{i:02d}.parquet" for i in range(40)]  # none twice, none lost
    assert not any(inbox.iterdir())
    assert claim_batch(inbox, tmp_path / "claims", "late") == []  # a later run finds nothing
    assert not (tmp_path / "claims" / "late").exists()


def test_a_single_file_inbox_is_claimed_and_archived(tmp_path):
    inbox = _inbox(tmp_path, 1)
    (claimed,) = claim_batch(inbox / "batch-00.parquet", tmp_path / "claims", "r1")
    assert claimed == tmp_path / "claims" / "r1" / "batch-00.parquet"
    move_files([claimed], tmp_path / "processed" / "run")
    assert (tmp_path / "processed" / "run" / "batch-00.parquet").exists()
    assert not (tmp_path / "claims" / "r1").exists()  # the empty claim folder goes too


def test_stale_claims_are_found_and_requeued(tmp_path):
    inbox = _inbox(tmp_path, 2)
    claim_batch(inbox, tmp_path / "claims", "dead")
    claim_batch(_inbox(tmp_path / "other", 1), tmp_path / "claims", "alive")
    hour_ago = time.time() - 3600
    os.utime(tmp_path / "claims" / "dead", (hour_ago, hour_ago))
    (stale,) = stale_claims(tmp_path / "claims", older_than_s=600)
    assert stale.name == "dead"
    assert [p.name for p in requeue(stale, inbox)] == ["batch-00.parquet", "batch-01.parquet"]
    assert sorted(p.name for p in inbox.iterdir()) == ["batch-00.parquet", "batch-01.parquet"]
    assert not stale.exists() and stale_claims(tmp_path / "missing", 1) == []


def test_a_claimed_single_file_inbox_goes_back_to_its_own_place(tmp_path):
    inbox = tmp_path / "drop" / "batch.csv"
    inbox.parent.mkdir()
    inbox.write_text("x")
    (claimed,) = claim_batch(inbox, tmp_path / "claims", "run-1")
    assert not inbox.exists()
    assert requeue(claimed.parent, inbox) == [inbox] and inbox.read_text() == "x"


def test_recovery_archives_under_a_finished_audit_else_fails_the_running_ones_and_requeues():
    assert recovery_for({"a": "FAILED", "b": "FINISHED", "c": "RUNNING"}) == Recovery("b", ())
    assert recovery_for({"a": "RUNNING", "c": "FAILED"}) == Recovery(None, ("a",))
    assert recovery_for({}) == Recovery(None, ())


def test_a_claim_that_cannot_be_an_audited_batch_has_no_digest(tmp_path):
    """Unreadable bytes or missing columns: no audit logged it, so it is requeued (and the next run
    quarantines it) instead of failing every later recovery."""
    claim = tmp_path / "claim"
    claim.mkdir()
    (claim / "a.csv").write_bytes(bytes(range(128, 256)))
    assert claim_digest(claim, Pixels((1, 8, 8))) is None
    (claim / "a.csv").write_text("example_id,other\nq,1\n")
    assert claim_digest(claim, Pixels((1, 8, 8))) is None
