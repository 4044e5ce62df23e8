"""The audit service: the `audit-and-correct` flow as a Prefect deployment on a schedule, plus the
MLflow webhook receiver that starts a run of it when a registry alias moves and guards `champion`.

`serve` runs both in one process (`model-audit serve`): the receiver in a uvicorn thread, the
deployment under `prefect.serve`, which also executes the runs the schedule and the receiver
create. Prefect decides where runs execute; this module only says what and when.
"""

from __future__ import annotations

import signal
import threading
from functools import partial
from typing import Literal

import prefect
import uvicorn
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, ConfigDict, Field

from audit.errors import AuditError
from flows.pipeline import audit_and_correct
from flows.settings import AuditSettings, CorrectionSettings, StoreSettings
from registry_hooks.registry import GUARD_MODES, RESTORE
from registry_hooks.store import tracking_uri
from registry_hooks.webhooks import RegistryEvent, champion_guard, receiver_app, receiver_config

DEPLOYMENT = "registry-audit"
FLOW = audit_and_correct.name


class ServiceSettings(BaseModel):
    """What the service audits and how (the flows' own settings, on one store), when it runs,
    where the webhook receiver listens, and what its registry guard does with a move of
    `champion` to a version without `audit.gates=passed`: `restore` the champion of record, or
    only `flag` it (registry_hooks.registry.guard_champion)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: StoreSettings = StoreSettings()
    audit: AuditSettings = AuditSettings()  # model_name and alias are also what the receiver watches
    correction: CorrectionSettings = CorrectionSettings()
    cron: str | None = Field("0 * * * *", description="audit schedule (cron); None = registry events only")
    host: str = Field("127.0.0.1", description="webhook receiver address")
    port: int = Field(8765, ge=1, le=65535, description="webhook receiver port")
    guard: Literal["restore", "flag"] = Field(
        RESTORE, description=f"registry guard on an ungated move of champion: {' | '.join(GUARD_MODES)}")

    def parameters(self) -> dict:
        """Parameters of the `audit-and-correct` flow for this service (JSON-ready)."""
        return {"store": self.store.model_dump(mode="json"),
                "audit_settings": self.audit.model_dump(mode="json"),
                "correction_settings": self.correction.model_dump(mode="json")}

    def registry_uri(self) -> str:
        """The MLflow registry the service watches and guards: `store.tracking_uri`, else the
        workdir's sqlite store."""
        return self.store.tracking_uri or tracking_uri(self.store.workdir)


def audit_deployment(service: ServiceSettings):
    """The `audit-and-correct/registry-audit` RunnerDeployment: the service's parameters, its cron
    schedule (if any). Serve it with `prefect.serve` or register it with `.apply()`."""
    audited = f"{service.audit.model_name}@{service.audit.alias}"
    return audit_and_correct.to_deployment(
        name=DEPLOYMENT, cron=service.cron, parameters=service.parameters(), tags=["model-audit"],
        concurrency_limit=1,  # one audit of the inbox at a time; the claim guards the rest
        description=f"Audit {audited} against its inbox and repair it behind the gates.")


def start_flow_run(service: ServiceSettings, event: RegistryEvent) -> str:
    """Create a run of the deployment for a registry event; returns the flow run id without
    waiting for it. The MLflow delivery id is the idempotency key, so a delivery MLflow retries
    starts one run, not two. AuditError when the Prefect API has no such deployment."""
    try:
        run = run_deployment(f"{FLOW}/{DEPLOYMENT}", parameters=service.parameters(), timeout=0,
                             idempotency_key=f"mlflow-delivery-{event.delivery_id}", as_subflow=False,
                             tags=["model-audit", f"mlflow:{event.kind}"],
                             flow_run_name=f"{event.model_name} v{event.version} @{event.alias}")
    except ObjectNotFound:
        from prefect.settings import PREFECT_API_URL

        where = PREFECT_API_URL.value() or "Prefect's temporary local server (PREFECT_API_URL is not set)"
        raise AuditError(f"The Prefect API at {where} has no deployment {FLOW}/{DEPLOYMENT}; run `model-audit serve` "
                         "without --receiver-only, or deploy deploy/prefect.yaml there.") from None
    return str(run.id)


def receiver_server(service: ServiceSettings, secret: str) -> uvicorn.Server:
    """A uvicorn Server (not started) for the webhook receiver of this service, with the registry
    guard on the service's registry in the service's guard mode."""
    app = receiver_app(secret, partial(start_flow_run, service), alias=service.audit.alias,
                       model_name=service.audit.model_name, guard=champion_guard(service.registry_uri(), service.guard))
    return uvicorn.Server(receiver_config(app, service.host, service.port))


def serve(service: ServiceSettings, secret: str, receiver_only: bool = False) -> None:
    """Run the service until interrupted: the receiver in a thread, the deployment in the foreground.
    `receiver_only`: just the receiver, for a deployment that deploy/prefect.yaml put on a work pool.

    SIGTERM stops it like Ctrl-C does: the receiver finishes the requests it holds, `prefect.serve`
    stops its runner, and the process leaves through Python's own shutdown, where Prefect stops
    the temporary API server it started when PREFECT_API_URL is unset. (Python's default SIGTERM
    action ends the process on the spot and would leave that server running, orphaned.)
    """
    _exit_cleanly_on_sigterm()
    receiver = receiver_server(service, secret)
    if receiver_only:
        receiver.run()
        return
    thread = threading.Thread(target=receiver.run, name="mlflow-webhook-receiver", daemon=True)
    thread.start()
    try:
        prefect.serve(audit_deployment(service))
    finally:
        receiver.should_exit = True
        thread.join(timeout=10)


def _exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(0) in the main thread, so `finally` blocks and atexit hooks run.

    uvicorn (receiver-only) and Prefect's runner (plain serve) install their own SIGTERM handlers
    while they run and stop gracefully on it; uvicorn then re-raises the signal to the handler it
    found, this one. It covers the moments outside them too, e.g. while `prefect.serve` registers
    the deployment, which already starts Prefect's temporary server. Later SIGTERMs are ignored
    so they cannot cut that cleanup short; SIGKILL remains for a shutdown that hangs.
    """
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(0)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
