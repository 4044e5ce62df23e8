"""The audit service: the `audit-and-correct` flow as a Prefect deployment on a schedule, plus the
MLflow webhook receiver that starts a run of it when a registry alias moves.

`serve` runs both in one process (`model-audit serve`): the receiver in a uvicorn thread, the
deployment under `prefect.serve`, which also executes the runs the schedule and the receiver
create. Prefect decides where runs execute; this module only says what and when.
"""

from __future__ import annotations

import threading
from functools import partial

import prefect
import uvicorn
from prefect.deployments import run_deployment
from pydantic import BaseModel, ConfigDict, Field

from flows.pipeline import audit_and_correct
from flows.settings import AuditSettings, CorrectionSettings
from registry_hooks.webhooks import RegistryEvent, receiver_app

DEPLOYMENT = "registry-audit"
FLOW = audit_and_correct.name


class ServiceSettings(BaseModel):
    """What the service audits and how (the flows' own settings; give both the same workdir and
    tracking URI), when it runs, and where the webhook receiver listens."""

    model_config = ConfigDict(frozen=True)

    audit: AuditSettings = AuditSettings()  # model_name and alias are also what the receiver watches
    correction: CorrectionSettings = CorrectionSettings()
    cron: str | None = Field("0 * * * *", description="audit schedule (cron); None = registry events only")
    host: str = Field("127.0.0.1", description="webhook receiver address")
    port: int = Field(8765, ge=1, le=65535, description="webhook receiver port")

    def parameters(self) -> dict:
        """Parameters of the `audit-and-correct` flow for this service (JSON-ready)."""
        return {"audit_settings": self.audit.model_dump(mode="json"),
                "correction_settings": self.correction.model_dump(mode="json")}


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
    starts one run, not two."""
    run = run_deployment(f"{FLOW}/{DEPLOYMENT}", parameters=service.parameters(), timeout=0,
                         idempotency_key=f"mlflow-delivery-{event.delivery_id}", as_subflow=False,
                         tags=["model-audit", f"mlflow:{event.kind}"],
                         flow_run_name=f"{event.model_name} v{event.version} @{event.alias}")
    return str(run.id)


def receiver_server(service: ServiceSettings, secret: str) -> uvicorn.Server:
    """A uvicorn Server (not started) for the webhook receiver of this service."""
    app = receiver_app(secret, partial(start_flow_run, service), alias=service.audit.alias,
                       model_name=service.audit.model_name)
    return uvicorn.Server(uvicorn.Config(app, host=service.host, port=service.port, log_level="warning"))


def serve(service: ServiceSettings, secret: str, receiver_only: bool = False) -> None:
    """Run the service until interrupted: the receiver in a thread, the deployment in the foreground.
    `receiver_only`: just the receiver, for a deployment that deploy/prefect.yaml put on a work pool."""
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
