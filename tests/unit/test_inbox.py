"""The inbox's claims on a real filesystem: each file is claimed exactly once however many runs
race for it; stale claims are found and handed back."""

import os
import threading
import time

from audit.inbox import claim_batch, move_files, requeue, stale_claims


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
