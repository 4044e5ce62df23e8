"""The typed `audit.*` tag schema: what is written is what is read back, and foreign runs are refused."""

import pytest

from audit.errors import AuditError
from registry_hooks.tags import RunTags, VersionTags, gates_passed


def test_run_tags_round_trip_and_leave_out_what_is_unset():
    audit = RunTags("m", "3", "audit", "sha256:abc")
    assert audit.to_mlflow() == {"audit.model_name": "m", "audit.model_version": "3", "audit.kind": "audit",
                                 "audit.flagged_digest": "sha256:abc"}
    correction = RunTags("m", "3", "correction", "sha256:abc", audit_run_id="r1", gates="failed")
    assert RunTags.from_mlflow({**correction.to_mlflow(), "mlflow.user": "x"}) == correction
    assert RunTags.from_mlflow(audit.to_mlflow()) == audit


def test_runs_not_logged_by_model_audit_are_refused_in_one_sentence():
    with pytest.raises(AuditError, match="Run r9 is not a model-audit run"):
        RunTags.from_mlflow({"mlflow.runName": "train"}, "r9")
    with pytest.raises(AuditError, match="lacks the tags audit.flagged_digest"):
        RunTags.from_mlflow({"audit.kind": "audit", "audit.model_name": "m", "audit.model_version": "1"}, "r9")


def test_version_tags_and_the_gates_check():
    tags = VersionTags("1", "r1").to_mlflow()
    assert tags == {"audit.source_version": "1", "audit.audit_run_id": "r1", "audit.gates": "passed"}
    assert gates_passed(tags) and not gates_passed({}) and not gates_passed({"audit.gates": "failed"})
