"""The `model-audit` command line. Errors in the user's input print one sentence and exit 2."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer
from pydantic import ValidationError

from audit.errors import AlreadyCorrected, AuditError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Audit and repair classifiers registered in MLflow.")

WORKDIR = typer.Option(Path("audit-workdir"), "--workdir", help="Holds mlflow.db, mlruns and the inbox.")
# Commands that read a store refuse a workdir that does not exist, instead of creating an empty
# one and then reporting that nothing is in it; only `demo` creates one.
EXISTING_WORKDIR = typer.Option(Path("audit-workdir"), "--workdir", exists=True, file_okay=False,
                                help="Holds mlflow.db, mlruns and the inbox (must exist; `demo` creates one).")


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs every failed flow/task with a traceback; for the user's own mistakes
    (AuditError) the CLI's one sentence says it all, so keep the log line, drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], AuditError):
            record.exc_info = None
            record.exc_text = None
        return True


def _run(action):
    """Run a command body; AuditError -> one sentence on stderr and exit code 2."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoTracebackForUserErrors())
    try:
        return action()
    except AuditError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        typer.echo(f"error: invalid settings ({problems}).", err=True)
        raise typer.Exit(code=2) from None


@app.command()
def demo(
    workdir: Path = WORKDIR,
    noise_rate: float = typer.Option(0.1, min=0.0, max=0.9, help="Fraction of training labels flipped."),
    seed: int = typer.Option(0, help="Seeds the split, the label noise and training."),
    epochs: int = typer.Option(40, min=1, help="Training epochs of the digits CNN."),
    method: str = typer.Option("ekfac", help="Influence method (ekfac, kfac, arnoldi, exact, graddot)."),
    min_fix_rate: float = typer.Option(0.5, min=0.0, max=1.0, help="Fix-rate gate."),
) -> None:
    """Train, register, flag, audit and repair a digits CNN end to end on embedded defaults."""
    from flows.demo import run_demo, summary

    result = _run(lambda: run_demo(workdir, noise_rate, seed, epochs, method, min_fix_rate))
    typer.echo(summary(result))


@app.command("audit")
def audit_command(
    workdir: Path = EXISTING_WORKDIR,
    model: str = typer.Option("digits-classifier", help="Registered model name."),
    alias: str = typer.Option("champion", help="Alias of the version to audit."),
    inbox: Path = typer.Option(None, help="Flagged batch file or folder (default <workdir>/inbox)."),
    method: str = typer.Option("ekfac", help="Influence method (ekfac, kfac, arnoldi, exact, graddot)."),
    top_k: int = typer.Option(10, min=1, help="Helpful and harmful examples kept per flagged example."),
) -> None:
    """Audit a registered model against a flagged batch; prints the audit run id."""
    from flows.audit_flow import audit
    from flows.settings import AuditSettings

    result = _run(lambda: audit(AuditSettings(workdir=workdir, model_name=model, alias=alias, inbox=inbox,
                                              method=method, top_k=top_k)))
    typer.echo(f"audit run {result.run_id}: {result.n_flagged} flagged, {result.n_candidates} correction candidates")


@app.command("correct")
def correct_command(
    audit_run_id: str = typer.Argument(..., help="Run id of an audit."),
    workdir: Path = EXISTING_WORKDIR,
    min_fix_rate: float = typer.Option(0.5, min=0.0, max=1.0, help="Fix-rate gate."),
    candidates: str = typer.Option(None, help="Repair candidates tried in order, comma-separated "
                                              "(default: relabel, unlearn-gentle, relabel-wide, "
                                              "relabel-wide-gentle, relabel-reinforce)."),
    selection_fraction: float = typer.Option(1 / 3, help="Share of the validation split that selects a candidate."),
) -> None:
    """Search for a repair of the audited model; registers @challenger only if every gate passes."""
    from flows.correct_flow import correct
    from flows.settings import CorrectionSettings

    def settings() -> CorrectionSettings:
        named = {"candidates": tuple(c.strip() for c in candidates.split(","))} if candidates else {}
        return CorrectionSettings(workdir=workdir, min_fix_rate=min_fix_rate, selection_fraction=selection_fraction,
                                  **named)

    def run():
        try:
            return correct(settings(), audit_run_id)
        except AlreadyCorrected as done:  # not an error: the work was done before
            return done

    result = _run(run)
    if isinstance(result, AlreadyCorrected):
        typer.echo(f"correction: {result}")
        return
    if result.registered_version:
        typer.echo(f"correction run {result.run_id}: registered version {result.registered_version} as @challenger")
    else:
        typer.echo(f"correction run {result.run_id}: not registered: " + "; ".join(result.failure_reasons()) + ".")
        sys.exit(1)


@app.command()
def promote(
    workdir: Path = EXISTING_WORKDIR,
    model: str = typer.Option("digits-classifier", help="Registered model name."),
    version: str = typer.Option(None, help="Version to promote (default: @challenger)."),
    force: bool = typer.Option(False, help="Allow a rollback to a version older than the champion."),
    reason: str = typer.Option(None, help="Why the rollback (required with --force; kept as a version tag)."),
) -> None:
    """Move @champion to a gated version after re-checking its gates tag (never backwards without --force)."""
    from registry_hooks.registry import promote as promote_version
    from registry_hooks.store import use_store

    use_store(workdir)
    if force and not (reason and reason.strip()):
        typer.echo("error: --force needs --reason saying why the rollback.", err=True)
        raise typer.Exit(code=2)
    promoted = _run(lambda: promote_version(model, version, force_reason=reason if force else None))
    typer.echo(f"{model} version {promoted} is now @champion")


SECRET_ENV = "MODEL_AUDIT_WEBHOOK_SECRET"


def _webhook_secret() -> str:
    import os

    from registry_hooks.webhooks import InvalidDelivery

    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        raise InvalidDelivery(f"Set {SECRET_ENV} to the secret shared by the MLflow webhook and the receiver.")
    return secret


@app.command()
def serve(
    workdir: Path = WORKDIR,
    tracking_uri: str = typer.Option(None, help="MLflow server URL (webhooks need `mlflow server`)."),
    model: str = typer.Option("digits-classifier", help="Registered model name."),
    alias: str = typer.Option("champion", help="Alias audited; moving it to a version starts a run."),
    method: str = typer.Option("ekfac", help="Influence method (ekfac, kfac, arnoldi, exact, graddot)."),
    min_fix_rate: float = typer.Option(0.5, min=0.0, max=1.0, help="Fix-rate gate."),
    cron: str = typer.Option("0 * * * *", help="Audit schedule (cron); '' = registry events only."),
    host: str = typer.Option("127.0.0.1", help="Webhook receiver address."),
    port: int = typer.Option(8765, help="Webhook receiver port."),
    receiver_only: bool = typer.Option(False, help="Only the webhook receiver (deployment on a work pool)."),
) -> None:
    """Serve the audit-and-correct deployment (schedule + MLflow webhook receiver) until Ctrl-C."""
    from deploy.service import ServiceSettings
    from deploy.service import serve as serve_service
    from flows.settings import AuditSettings, CorrectionSettings

    def start() -> None:
        service = ServiceSettings(
            audit=AuditSettings(workdir=workdir, tracking_uri=tracking_uri, model_name=model, alias=alias,
                                method=method),
            correction=CorrectionSettings(workdir=workdir, tracking_uri=tracking_uri, min_fix_rate=min_fix_rate),
            cron=cron or None, host=host, port=port)
        serve_service(service, _webhook_secret(), receiver_only)

    _run(start)


@app.command("register-webhook")
def register_webhook_command(
    tracking_uri: str = typer.Option(..., help="MLflow server URL (a SQL-backed `mlflow server`)."),
    url: str = typer.Option("http://127.0.0.1:8765/mlflow/webhook", help="Where `model-audit serve` listens."),
) -> None:
    """Create or update the MLflow webhook that tells `model-audit serve` when an alias moves."""
    from registry_hooks.webhooks import register_webhook_at

    webhook_id = _run(lambda: register_webhook_at(tracking_uri, url, _webhook_secret()))
    typer.echo(f"webhook {webhook_id}: model_version_alias.created -> {url}")
