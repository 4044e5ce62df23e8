"""The audit service: the `audit-and-correct` flow as a Prefect deployment on a schedule, plus the
MLflow webhook receiver that starts a run of it when a registry alias moves.

`serve` runs both in one process (`model-audit serve`): the receiver in a uvicorn thread, the
deployment under `prefect.serve`, which also executes the runs the schedule and the receiver
create. Prefect decides where runs execute; this module only says what and when.
"""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.settings import AuditSettings, CorrectionSettings

DEPLOYMENT = "registry-audit"
FLOW = "audit-and-correct"


class ServiceSettings(BaseModel):
    """What the service audits, where MLflow lives, when it runs and where it listens."""

    model_config = ConfigDict(frozen=True)

    workdir: Path = Field(Path("audit-workdir"), description="holds the inbox, caches and (default) mlflow.db")
    tracking_uri: str | None = Field(None, description="MLflow server URL; webhooks need one (SQL backend)")
    model_name: str = Field("digits-classifier", min_length=1)
    alias: str = Field("champion", min_length=1, description="alias audited; moving it starts a run")
    method: str = Field("ekfac", description="influence method of audit.influence")
    min_fix_rate: float = Field(0.5, ge=0.0, le=1.0, description="flagged fix-rate gate")
    cron: str | None = Field("0 * * * *", description="audit schedule (cron); None = events only")
    host: str = Field("127.0.0.1", description="webhook receiver address")
    port: int = Field(8765, ge=1, le=65535, description="webhook receiver port")

    @model_validator(mode="after")
    def _flow_settings_valid(self) -> ServiceSettings:
        self.parameters()  # the flows' own settings check method, paths and thresholds once, here
        return self

    def parameters(self) -> dict:
        """Parameters of the `audit-and-correct` flow for this service (JSON-ready)."""
        audit = AuditSettings(workdir=self.workdir, model_name=self.model_name, alias=self.alias,
                              tracking_uri=self.tracking_uri, method=self.method)
        correction = CorrectionSettings(workdir=self.workdir, tracking_uri=self.tracking_uri,
                                        min_fix_rate=self.min_fix_rate)
        return {"audit_settings": audit.model_dump(mode="json"),
                "correction_settings": correction.model_dump(mode="json")}


def audit_deployment(service: ServiceSettings):
    """The `audit-and-correct/registry-audit` RunnerDeployment: the service's parameters, its cron
    schedule (if any). Serve it with `prefect.serve` or register it with `.apply()`."""
    from flows.pipeline import audit_and_correct

    return audit_and_correct.to_deployment(
        name=DEPLOYMENT, cron=service.cron, parameters=service.parameters(), tags=["model-audit"],
        description=f"Audit {service.model_name}@{service.alias} against its inbox and repair it behind the gates.")


def start_flow_run(service: ServiceSettings, event) -> str:
    """Create a run of the deployment for a registry event (a `RegistryEvent`); returns the flow
    run id without waiting for it. The MLflow delivery id is the idempotency key, so a delivery
    MLflow retries starts one run, not two."""
    from prefect.deployments import run_deployment

    run = run_deployment(f"{FLOW}/{DEPLOYMENT}", parameters=service.parameters(), timeout=0,
                         idempotency_key=f"mlflow-delivery-{event.delivery_id}", as_subflow=False,
                         tags=["model-audit", f"mlflow:{event.kind}"],
                         flow_run_name=f"{event.model_name} v{event.version} @{event.alias}")
    return str(run.id)


def receiver_server(service: ServiceSettings, secret: str):
    """A uvicorn Server (not started) for the webhook receiver of this service."""
    import uvicorn

    from registry_hooks.webhooks import receiver_app

    app = receiver_app(secret, partial(start_flow_run, service), alias=service.alias, model_name=service.model_name)
    return uvicorn.Server(uvicorn.Config(app, host=service.host, port=service.port, log_level="warning"))


def serve(service: ServiceSettings, secret: str, receiver_only: bool = False) -> None:
    """Run the service until interrupted: the receiver in a thread, the deployment in the foreground.
    `receiver_only`: just the receiver, for a deployment that deploy/prefect.yaml put on a work pool."""
    import prefect

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
