"""Registering and promoting model versions: aliases and tags, never the deprecated stages.

A repaired model becomes a version only after every gate passed (the correction flow logs
`gates.json` before calling here); `champion` moves only through `promote`, which re-checks the
`audit.gates` tag.
"""

from __future__ import annotations

import mlflow
from mlflow.tracking import MlflowClient

from audit.errors import AlreadyCorrected, AuditError
from registry_hooks.tags import AUDIT_RUN_ID, PROMOTION_OVERRIDE, VersionTags, gates_passed

CHAMPION = "champion"
CHALLENGER = "challenger"


def register_version(model_uri: str, name: str, alias: str, tags: dict[str, str] | None = None) -> str:
    """Register `model_uri` as a new version of `name`, tag it, point `alias` at it; returns the version."""
    mv = mlflow.register_model(model_uri, name, tags=tags or {})
    MlflowClient().set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def register_challenger(model_uri: str, name: str, source_version: str, audit_run_id: str) -> str:
    """Register a gated repair with the DESIGN.md tags and alias `challenger`; returns the version.
    Raises AlreadyCorrected when a version from this audit exists (one audit, one version)."""
    refuse_if_corrected(name, audit_run_id)
    return register_version(model_uri, name, CHALLENGER, VersionTags(source_version, audit_run_id).to_mlflow())


def refuse_if_corrected(name: str, audit_run_id: str) -> None:
    """AlreadyCorrected naming the version of `name` registered from audit `audit_run_id`, if any."""
    found = MlflowClient().search_model_versions(f"name='{name}' and tags.`{AUDIT_RUN_ID}` = '{audit_run_id}'")
    if found:
        version = str(min(int(v.version) for v in found))
        raise AlreadyCorrected(f"Audit run {audit_run_id} was already corrected: version {version} of {name} is "
                               "registered from it (one audit registers at most one version).", version)


def promote(name: str, version: str | None = None, force_reason: str | None = None) -> str:
    """Move `champion` to `version` (default: the current `challenger`) after re-checking that its
    gates passed; returns the promoted version. A version older than the current champion is a
    rollback: refused unless `force_reason` says why, which is then recorded on that version as
    tag `audit.promotion_override`. Raises `AuditError` otherwise."""
    client = MlflowClient()
    try:
        mv = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, CHALLENGER)
    except mlflow.exceptions.MlflowException as exc:
        raise AuditError(f"No version {version or '@' + CHALLENGER} of model {name} to promote.") from exc
    if not gates_passed(mv.tags):
        raise AuditError(
            f"Version {mv.version} of {name} has no `audit.gates=passed` tag; only gated repairs can become champion."
        )
    current = _alias_version(client, name, CHAMPION)
    if current is not None and int(mv.version) < current:
        if not (force_reason and force_reason.strip()):
            raise AuditError(f"Version {mv.version} of {name} is older than champion version {current}; a rollback "
                             "needs --force with --reason.")
        client.set_model_version_tag(name, mv.version, PROMOTION_OVERRIDE,
                                     f"rollback from version {current}: {force_reason.strip()}")
    client.set_registered_model_alias(name, CHAMPION, mv.version)
    return str(mv.version)


def _alias_version(client: MlflowClient, name: str, alias: str) -> int | None:
    """The version number `alias` points at, or None when it points nowhere."""
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None
