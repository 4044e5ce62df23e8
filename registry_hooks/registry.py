"""Registering and promoting model versions: aliases and tags, never the deprecated stages.

A repaired model becomes a version only after every gate passed (the correction flow logs
`gates.json` before calling here); `champion` moves only through `promote`, which re-checks the
`audit.gates` tag. Every move of `champion` model-audit makes first records the new champion as
the registered model's tag `audit.champion_of_record`, then moves the alias. The registry guard
(`guard_champion`, called by the webhook receiver for every `champion` alias event) holds anyone
else, the MLflow UI included, to the same rule: a move to a version without `audit.gates=passed`
is undone (champion back to the version of record) or, in `flag` mode, only flagged; either way
the version and the registered model are tagged `audit.guard` and a warning is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import mlflow
from mlflow.tracking import MlflowClient

from audit.errors import AlreadyCorrected, AuditError
from registry_hooks.tags import (
    AUDIT_RUN_ID,
    CHAMPION_OF_RECORD,
    GUARD,
    PROMOTION_OVERRIDE,
    VersionTags,
    gates_passed,
)

CHAMPION = "champion"
CHALLENGER = "challenger"

RESTORE, FLAG = "restore", "flag"
GUARD_MODES = (RESTORE, FLAG)
# What MLflow answers for an alias, or a model, that does not exist (sqlite store and server alike).
NOT_FOUND = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")

logger = logging.getLogger("model_audit.registry_guard")


def register_version(model_uri: str, name: str, alias: str, tags: dict[str, str] | None = None) -> str:
    """Register `model_uri` as a new version of `name`, tag it, point `alias` at it; returns the
    version. Pointing `champion` at it records it as the champion of record first: a baseline
    that model-audit's own training registers is a deliberate champion, which the guard keeps."""
    mv = mlflow.register_model(model_uri, name, tags=tags or {})
    client = MlflowClient()
    if alias == CHAMPION:
        client.set_registered_model_tag(name, CHAMPION_OF_RECORD, str(mv.version))
    client.set_registered_model_alias(name, alias, mv.version)
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


def promote(name: str, version: str | None = None, force_reason: str | None = None,
            client: MlflowClient | None = None) -> str:
    """Move `champion` to `version` (default: the current `challenger`) after re-checking that its
    gates passed; returns the promoted version. A version older than the current champion is a
    rollback: refused unless `force_reason` says why, which is then recorded on that version as
    tag `audit.promotion_override`. Raises `AuditError` otherwise. The promoted version is
    recorded as `audit.champion_of_record` before the alias moves, so the registry guard, which
    sees the alias event afterwards, restores this version if champion is later moved to an
    ungated one. `client`: the registry to act on (default: MLflow's current one)."""
    client = client or MlflowClient()
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
    client.set_registered_model_tag(name, CHAMPION_OF_RECORD, str(mv.version))
    client.set_registered_model_alias(name, CHAMPION, mv.version)
    return str(mv.version)


@dataclass(frozen=True)
class GuardOutcome:
    """What the registry guard did about one `champion` alias event on `name` (champion was moved
    to `version`):

    - `kept`: the version carries `audit.gates=passed` or is the champion of record;
    - `restored`: it did not, and champion was moved back to `restored_to` (mode `restore`);
    - `flagged`: it did not, and champion stays (mode `flag`, or nothing to restore: `message` says which);
    - `stale`: champion no longer points at `version` (a later move has its own event), nothing done.
    """

    action: str
    name: str
    version: str
    restored_to: str | None
    message: str

    def to_json(self) -> dict[str, str | None]:
        return {"action": self.action, "version": self.version, "restored_to": self.restored_to,
                "message": self.message}


def guard_champion(client: MlflowClient, name: str, version: str, mode: str = RESTORE) -> GuardOutcome:
    """Hold a move of `name@champion` to `version`, by anyone, to `promote`'s rule (see GuardOutcome).

    An ungated move is tagged `audit.guard` on that version and on the registered model, and
    logged as a warning; in `restore` mode champion then goes back to `audit.champion_of_record`.
    A gated move that was not recorded (e.g. made in the MLflow UI) becomes the champion of record.
    No loop: the guard's own restore points champion at the champion of record, whose event is
    `kept`. The decision is made on the registry's current state, not the event's, so a delayed
    or repeated delivery does nothing (`stale`). Not atomic against a concurrent `promote`: the
    champion of record is read again just before restoring, and `promote` writes it before it
    moves the alias, so a promotion that lands meanwhile is restored to rather than undone.
    """
    if mode not in GUARD_MODES:
        raise AuditError(f"Unknown registry guard mode {mode!r}; choose one of {', '.join(GUARD_MODES)}.")
    version = str(version)
    current = _alias_version(client, name, CHAMPION)
    if current is None or str(current) != version:
        return GuardOutcome("stale", name, version, None, f"@{CHAMPION} of {name} is no longer version {version} "
                                                          f"(now {current}); nothing to check.")
    mv = client.get_model_version(name, version)
    record = _champion_of_record(client, name)
    if record == version:
        return GuardOutcome("kept", name, version, None, f"version {version} is the champion of record.")
    if gates_passed(mv.tags):
        client.set_registered_model_tag(name, CHAMPION_OF_RECORD, version)
        return GuardOutcome("kept", name, version, None, f"version {version} carries audit.gates=passed.")

    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    moved = f"@{CHAMPION} was moved to version {version}, which lacks audit.gates=passed ({when})"
    if mode == RESTORE:
        record = _champion_of_record(client, name)  # again: a promote may have landed meanwhile
        if record is None:
            return _flag(client, name, version, f"{moved}; flagged, not restored: no champion of record to go back "
                                                f"to (set {CHAMPION} with `model-audit promote`).")
        try:
            client.set_registered_model_alias(name, CHAMPION, record)
        except mlflow.exceptions.MlflowException as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return _flag(client, name, version, f"{moved}; flagged, not restored: moving it back to version "
                                                f"{record} failed ({reason}).")
        message = f"{moved}; restored to version {record}, the champion of record."
        _tag(client, name, version, f"restored: {message}")
        logger.warning("registry guard: %s %s", name, message)
        return GuardOutcome("restored", name, version, record, message)
    suffix = f"champion of record: version {record}" if record else "no champion of record"
    return _flag(client, name, version, f"{moved}; flagged, left in place ({suffix}).")


def _flag(client: MlflowClient, name: str, version: str, message: str) -> GuardOutcome:
    _tag(client, name, version, f"flagged: {message}")
    logger.warning("registry guard: %s %s", name, message)
    return GuardOutcome("flagged", name, version, None, message)


def _tag(client: MlflowClient, name: str, version: str, text: str) -> None:
    """The guard's note on the version champion was moved to and on the registered model."""
    client.set_model_version_tag(name, version, GUARD, text)
    client.set_registered_model_tag(name, GUARD, f"version {version} {text}")


def _champion_of_record(client: MlflowClient, name: str) -> str | None:
    return client.get_registered_model(name).tags.get(CHAMPION_OF_RECORD)


def _alias_version(client: MlflowClient, name: str, alias: str) -> int | None:
    """The version number `alias` points at, or None when it (or the model) does not exist. Any
    other failure, e.g. an unreachable registry, raises: it says nothing about the alias."""
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in NOT_FOUND:
            return None
        raise
