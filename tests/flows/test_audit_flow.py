"""The `audit` flow through Prefect's ephemeral server and a real MLflow store."""

import json
import re

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from audit.errors import InvalidFlaggedBatch
from audit.flagged import write_batch
from flows.audit_flow import audit
from flows.settings import AuditSettings, StoreSettings
from registry_hooks.audit_log import load_table
from registry_hooks.registry import register_version
from tests.digits_helpers import log_small_cnn


@pytest.fixture
def registered(mlflow_store, digits_splits):
    """A briefly trained digits CNN registered as m@champion with its data lineage."""
    uri, frame = log_small_cnn(digits_splits, n_flagged=6)
    register_version(uri, "m", "champion")
    return mlflow_store, frame


def test_audit_logs_the_design_layout_and_archives_the_batch(prefect_harness, registered):
    workdir, frame = registered
    write_batch(frame, workdir / "inbox" / "batch.parquet")
    store = StoreSettings(workdir=workdir, allow_pickle=True)
    result = audit(store, AuditSettings(model_name="m", top_k=5, method="graddot"))

    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["audit.kind"] == "audit"
    assert run.data.tags["audit.model_name"] == "m" and run.data.tags["audit.model_version"] == "1"
    assert run.data.tags["audit.flagged_digest"] == result.flagged_digest
    names = {a.path for a in MlflowClient().list_artifacts(result.run_id, "audit")}
    assert {"audit/report.html", "audit/influence.parquet", "audit/self_influence.parquet",
            "audit/correction_candidates.parquet", "audit/flagged_validation.json",
            "audit/influence_grid.png"} <= names
    report = mlflow.artifacts.load_text(f"runs:/{result.run_id}/audit/report.html")
    # the suspects are explained next to their table; table cells show rounded numbers
    assert "relabel: harmful to the flagged examples listed" in report
    assert "data:image/png;base64," in report and not re.search(r"<td>-?\d+\.\d{6,}", report)
    assert result.verdict.next_command.startswith(f"model-audit correct {result.run_id} --workdir")
    assert f'<code class="next-command">{result.verdict.next_command}</code>' in report
    suspects = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/audit/suspects.json"))
    assert len(suspects["data"]) == result.n_candidates and "picture" in suspects["columns"]
    # an operator watching Prefect sees the outcome without opening MLflow
    from prefect.artifacts import Artifact

    outcome = Artifact.get("audit-outcome")
    assert result.verdict.next_command in outcome.data and f"/runs/{result.run_id}" in outcome.data
    assert len(json.loads(Artifact.get("audit-table").data)) == min(result.n_candidates, 20)
    table = load_table(result.run_id, "influence")
    assert len(table) == len(frame) * 2 * 5
    helpful = table[table.role == "helpful"]
    harmful = table[table.role == "harmful"]
    assert (helpful.score > 0).mean() > 0.9 and (harmful.score < 0).mean() > 0.9
    assert not any((workdir / "inbox").iterdir())
    assert (workdir / "processed" / result.run_id / "batch.parquet").exists()


def test_a_bad_batch_is_quarantined_and_nothing_is_logged(prefect_harness, registered):
    workdir, frame = registered
    frame.loc[0, "true_label"] = 42
    write_batch(frame, workdir / "inbox" / "bad.parquet")
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(InvalidFlaggedBatch, match="`true_label` in the label set 0..9"):
        audit(StoreSettings(workdir=workdir, allow_pickle=True), AuditSettings(model_name="m"))
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before
    (quarantined,) = (workdir / "quarantine").iterdir()
    assert (quarantined / "bad.parquet").exists()
    assert json.loads((quarantined / "flagged_validation.json").read_text())["success"] is False
    assert len(MlflowClient().search_model_versions("name='m'")) == 1


def test_an_unreadable_file_quarantines_the_batch_so_later_runs_are_not_blocked(prefect_harness, registered):
    workdir, frame = registered
    write_batch(frame, workdir / "inbox" / "good.parquet")
    (workdir / "inbox" / "torn.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(InvalidFlaggedBatch, match=r"Cannot read flagged batch torn.parquet: .* The batch was moved to"):
        audit(StoreSettings(workdir=workdir, allow_pickle=True), AuditSettings(model_name="m"))
    assert not any((workdir / "inbox").iterdir())
    (quarantined,) = (workdir / "quarantine").iterdir()
    assert {p.name for p in quarantined.iterdir()} == {"good.parquet", "torn.parquet", "flagged_validation.json"}
    assert "torn.parquet" in json.loads((quarantined / "flagged_validation.json").read_text())["error"]


def _stale_claim(workdir, name, frame):
    """A batch claimed by a run that died an hour ago."""
    import os
    import time

    folder = workdir / "claims" / name
    write_batch(frame, folder / "batch.parquet")
    hour_ago = time.time() - 3600
    os.utime(folder, (hour_ago, hour_ago))
    return folder


def test_batches_of_runs_that_died_are_audited_once(prefect_harness, registered):
    from audit.errors import EmptyInbox
    from audit.flagged import batch_digest, read_batch_file
    from audit.modalities import Pixels
    from registry_hooks.tags import RunTags

    workdir, frame = registered
    store = StoreSettings(workdir=workdir, allow_pickle=True)
    settings = AuditSettings(model_name="m", top_k=5, method="graddot")
    # died after claiming, before logging: the batch is re-queued and audited
    _stale_claim(workdir, "died-early", frame)
    first = audit(store, settings)
    assert first.n_flagged == len(frame) and (workdir / "processed" / first.run_id / "batch.parquet").exists()
    # died after its audit was logged in full: archived under that audit, not audited again
    _stale_claim(workdir, "died-after-logging", frame)
    with pytest.raises(EmptyInbox):
        audit(store, settings)
    assert not (workdir / "claims" / "died-after-logging").exists()
    assert len(mlflow.search_runs(filter_string="tags.`audit.kind` = 'audit'")) == 1
    # died while logging: its run is marked FAILED and the batch audited again
    partial = frame.iloc[:-1]
    claimed = _stale_claim(workdir, "died-logging", partial) / "batch.parquet"
    client = MlflowClient()
    experiment = client.get_experiment_by_name("model-audit").experiment_id
    digest = batch_digest(read_batch_file(claimed), Pixels((1, 8, 8)))  # as the audit computes it, from the file
    half = client.create_run(experiment, tags=RunTags("m", "1", "audit", digest).to_mlflow())
    second = audit(store, settings)
    assert client.get_run(half.info.run_id).info.status == "FAILED"
    assert second.n_flagged == len(partial) and second.run_id != half.info.run_id
    assert not any((workdir / "claims").iterdir())


def test_an_audit_with_the_gradient_index_builds_it_once_per_version(prefect_harness, registered):
    workdir, frame = registered
    store = StoreSettings(workdir=workdir, allow_pickle=True)
    write_batch(frame.iloc[:3], workdir / "inbox" / "first.parquet")
    first = audit(store, AuditSettings(model_name="m", top_k=5, method="index"))
    params = MlflowClient().get_run(first.run_id).data.params
    assert params["method"] == "index" and int(params["index_rows"]) == 300 and int(params["index_dim"]) > 0
    shards = sorted((workdir / "cache" / "influence" / "index").rglob("shards/*.npy"))
    assert shards and params["index_folder"].startswith(str(workdir / "cache" / "influence" / "index"))
    built = [p.stat().st_mtime_ns for p in shards]

    write_batch(frame.iloc[3:], workdir / "inbox" / "second.parquet")
    second = audit(store, AuditSettings(model_name="m", top_k=5, method="index"))
    # the second audit of the version reads the index the first one built
    assert sorted((workdir / "cache" / "influence" / "index").rglob("shards/*.npy")) == shards
    assert [p.stat().st_mtime_ns for p in shards] == built
    table = load_table(second.run_id, "influence")
    assert len(table) == (len(frame) - 3) * 2 * 5
    assert (table[table.role == "helpful"].score > 0).mean() > 0.9
    assert (table[table.role == "harmful"].score < 0).mean() > 0.9


def test_a_reranked_audit_reads_the_index_and_reports_exact_scores_of_its_shortlists(prefect_harness, registered):
    from audit.scoring import RERANK_SHORTLIST

    workdir, frame = registered
    store = StoreSettings(workdir=workdir, allow_pickle=True)
    write_batch(frame.iloc[:3], workdir / "inbox" / "first.parquet")
    first = audit(store, AuditSettings(model_name="m", top_k=5, method="index-reranked"))
    params = MlflowClient().get_run(first.run_id).data.params
    assert params["method"] == "index-reranked" and int(params["index_rows"]) == 300
    assert params["rerank_method"] == "ekfac" and int(params["rerank_shortlist"]) == RERANK_SHORTLIST
    assert int(params["rerank_fit_rows"]) == 300 and 2 * RERANK_SHORTLIST <= int(params["rerank_scored_rows"]) <= 300
    cache = workdir / "cache" / "influence" / "index"
    fitted = sorted(p for p in cache.rglob("rerank/*") if p.is_file())
    assert fitted  # the re-scoring curvature, fitted once, kept beside the index
    written = [p.stat().st_mtime_ns for p in fitted]
    table = load_table(first.run_id, "influence")
    assert len(table) == 3 * 2 * 5
    assert (table[table.role == "helpful"].score > 0).mean() > 0.9
    assert (table[table.role == "harmful"].score < 0).mean() > 0.9

    write_batch(frame.iloc[3:6], workdir / "inbox" / "second.parquet")
    audit(store, AuditSettings(model_name="m", top_k=5, method="index-reranked"))
    assert sorted(p for p in cache.rglob("rerank/*") if p.is_file()) == fitted  # restored, not refitted
    assert [p.stat().st_mtime_ns for p in fitted] == written


def test_an_audit_on_a_local_dask_cluster_finds_what_a_single_process_audit_finds(prefect_harness, registered):
    import torch

    workdir, frame = registered
    store = StoreSettings(workdir=workdir, allow_pickle=True)
    write_batch(frame, workdir / "inbox" / "on-dask.parquet")
    on_dask = audit(store, AuditSettings(model_name="m", top_k=5, method="index", workers=2))
    write_batch(frame, workdir / "inbox" / "here.parquet")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on each Dask worker: the same sums in the same order
    try:
        here = audit(store, AuditSettings(model_name="m", top_k=5, method="index"))
    finally:
        torch.set_num_threads(threads)
    params = {r.run_id: MlflowClient().get_run(r.run_id).data.params for r in (on_dask, here)}
    assert params[on_dask.run_id]["scale_out"] == "dask LocalCluster(2)"
    assert params[here.run_id]["scale_out"] == "this process"
    for name in ("influence", "self_influence", "correction_candidates"):
        pd.testing.assert_frame_equal(load_table(on_dask.run_id, name), load_table(here.run_id, name))


def test_audit_settings_take_one_kind_of_cluster():
    with pytest.raises(ValueError, match="not both"):
        AuditSettings(workers=2, dask_address="tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="dask_address"):
        AuditSettings(dask_address="127.0.0.1:8786")
