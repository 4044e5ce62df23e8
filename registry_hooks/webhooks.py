"""MLflow registry webhooks: register one that calls the audit service, and receive its deliveries.

MLflow (3.3+, `mlflow server` with a SQL backend only) POSTs a JSON envelope
`{"entity", "action", "timestamp", "data"}` for registry events, signed with HMAC-SHA256 over
`"<delivery id>.<unix timestamp>.<body>"` (headers X-MLflow-Delivery-Id, X-MLflow-Timestamp,
X-MLflow-Signature = "v1,<base64 digest>"). The receiver here checks that signature and the
timestamp's age, turns the delivery into a `RegistryEvent`, lets the registry guard check every
`champion` move (registry_hooks.registry.guard_champion: an ungated move is undone or flagged)
and hands the events it watches to a callback the caller supplies (deploy/ starts a Prefect flow
run there); this module knows nothing about Prefect.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.webhooks.constants import (
    WEBHOOK_DELIVERY_ID_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
    WEBHOOK_SIGNATURE_VERSION,
    WEBHOOK_TIMESTAMP_HEADER,
)

from audit.errors import AuditError
from registry_hooks.registry import CHAMPION, RESTORE, GuardOutcome, guard_champion

RECEIVER_PATH = "/mlflow/webhook"
# A delivery older than this is refused as a possible replay (MLflow retries within seconds).
MAX_DELIVERY_AGE_S = 300
# The registry event that starts an audit: an alias (by default `champion`) moved to a version.
WATCHED_EVENT = "model_version_alias.created"
# MLflow's alias envelopes are a few hundred bytes; anything far larger is refused unread (413).
MAX_BODY_BYTES = 64 * 1024
# MLflow's request head is a few hundred bytes; h11 refuses a larger one than this with a 400.
MAX_HEADER_BYTES = 16 * 1024

logger = logging.getLogger("model_audit.webhooks")


class InvalidDelivery(AuditError):
    """A webhook request that is not a correctly signed, fresh MLflow delivery."""


@dataclass(frozen=True)
class RegistryEvent:
    """One MLflow registry event as delivered: `entity`.`action` (e.g. model_version_alias.created)
    on `model_name` (and `version` / `alias` when the event has them)."""

    entity: str
    action: str
    model_name: str
    version: str | None
    alias: str | None
    delivery_id: str

    @property
    def kind(self) -> str:
        return f"{self.entity}.{self.action}"


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The X-MLflow-Signature value MLflow sends for this delivery: "v1,<base64 HMAC-SHA256>"."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{WEBHOOK_SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify_delivery(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None) -> str:
    """Check a delivery's signature and age (at most MAX_DELIVERY_AGE_S seconds, `now` in Unix
    seconds, default the clock); returns its delivery id. Raises InvalidDelivery otherwise."""
    lowered = {k.lower(): v for k, v in headers.items()}
    delivery_id = lowered.get(WEBHOOK_DELIVERY_ID_HEADER.lower())
    timestamp = lowered.get(WEBHOOK_TIMESTAMP_HEADER.lower())
    sent = lowered.get(WEBHOOK_SIGNATURE_HEADER.lower())
    if not (delivery_id and timestamp and sent):
        raise InvalidDelivery("The request lacks MLflow's delivery id, timestamp or signature header; "
                              "register the webhook with a secret.")
    try:
        age = (time.time() if now is None else now) - int(timestamp)
    except ValueError:
        raise InvalidDelivery(f"The delivery timestamp {timestamp!r} is not Unix seconds.") from None
    if abs(age) > MAX_DELIVERY_AGE_S:
        raise InvalidDelivery(f"The delivery is {age:.0f} s old (at most {MAX_DELIVERY_AGE_S} s accepted).")
    # compare bytes: compare_digest refuses str with non-ASCII characters (a header can carry them)
    if not hmac.compare_digest(sent.encode("utf-8", "replace"),
                               signature(secret, delivery_id, timestamp, body).encode()):
        raise InvalidDelivery("The delivery's signature does not match the shared secret.")
    return delivery_id


def parse_event(body: bytes, delivery_id: str) -> RegistryEvent:
    """The RegistryEvent of a verified delivery body; InvalidDelivery if it is not MLflow's envelope."""
    try:
        envelope = json.loads(body)
        data = envelope["data"]
        return RegistryEvent(entity=str(envelope["entity"]), action=str(envelope["action"]),
                             model_name=str(data["name"]),
                             version=None if data.get("version") is None else str(data["version"]),
                             alias=data.get("alias"), delivery_id=delivery_id)
    except RecursionError:
        raise InvalidDelivery("The delivery body nests JSON too deeply to be an MLflow registry event.") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidDelivery(f"The delivery body is not an MLflow registry event ({exc!r}).") from None


def receiver_app(secret: str, on_event: Callable[[RegistryEvent], str], alias: str = "champion",
                 model_name: str | None = None,
                 guard: Callable[[RegistryEvent], GuardOutcome] | None = None) -> FastAPI:
    """An ASGI app that accepts MLflow deliveries at RECEIVER_PATH.

    A correctly signed `model_version_alias.created` event for `alias` (and `model_name`, when
    given) calls `on_event` and answers 202 with what it returned (e.g. a flow run id); other
    registry events answer 200 "ignored" (MLflow sends test deliveries too). With a `guard`
    (`champion_guard`), every signed `champion` event of the model(s) watched is checked first:
    a move it undid answers 200 "reverted" and starts nothing (the restore's own event does),
    and the response of any other carries the guard's outcome.

    Refused, starting nothing: a Content-Type other than application/json 415; a missing,
    malformed or wrong signature or a timestamp more than MAX_DELIVERY_AGE_S away 401; a delivery
    id already handled within that window (a replay) 409; a body over MAX_BODY_BYTES 413 (read
    no further); an undecodable, too deeply nested or non-envelope body 400. When the guard or
    `on_event` fails (e.g. the registry or Prefect is unreachable) 503, which MLflow retries with
    the same delivery id. `on_event` should return quickly: it starts work, it does not do it.
    Guard checks run one at a time. The API docs routes are off.
    """
    if not secret:
        raise InvalidDelivery("The webhook receiver needs a non-empty shared secret.")
    app = FastAPI(title="model-audit MLflow webhook receiver", docs_url=None, redoc_url=None, openapi_url=None)
    seen = _DeliveryLog(MAX_DELIVERY_AGE_S)
    guard_lock = threading.Lock()  # the guard reads, then moves an alias: one event at a time

    def guarded(event: RegistryEvent) -> GuardOutcome:
        with guard_lock:
            return guard(event)

    @app.post(RECEIVER_PATH)
    async def receive(request: Request, response: Response) -> dict:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise HTTPException(status_code=415, detail="MLflow deliveries are application/json.")
        body = await _limited_body(request)
        try:
            delivery_id = verify_delivery(secret, request.headers, body)
        except InvalidDelivery as exc:
            raise HTTPException(status_code=401, detail=str(exc)) from None
        try:
            event = parse_event(body, delivery_id)
        except InvalidDelivery as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        if not seen.claim(delivery_id):
            raise HTTPException(status_code=409, detail=f"Delivery {delivery_id} was already received.")
        try:
            return await _handle(event, response)
        except Exception as exc:
            seen.release(delivery_id)  # not handled: MLflow's retry of this delivery must get through
            what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            # An operator needs the trace of an unexpected failure; ours, and MLflow's (e.g. the registry
            # is unreachable), say what happened in their first line.
            logger.error("webhook delivery %s (%s on %s) failed: %s", delivery_id, event.kind, event.model_name, what,
                         exc_info=not isinstance(exc, AuditError | MlflowException))
            raise HTTPException(status_code=503, detail=f"The delivery could not be handled: {what}") from None

    async def _handle(event: RegistryEvent, response: Response) -> dict:
        ours = event.kind == WATCHED_EVENT and (model_name is None or event.model_name == model_name)
        outcome = None
        if guard is not None and ours and event.alias == CHAMPION:
            # In a worker thread, like on_event: the MLflow client is synchronous.
            outcome = await run_in_threadpool(guarded, event)
            if outcome.action == "restored":
                return {"status": "reverted", "event": event.kind, "model": event.model_name,
                        "version": event.version, "guard": outcome.to_json()}
        answer = {"event": event.kind, **({"guard": outcome.to_json()} if outcome else {})}
        if not (ours and event.alias == alias):
            return {"status": "ignored", **answer}
        # In a worker thread: on_event may call synchronous clients that refuse a running loop.
        started = await run_in_threadpool(on_event, event)
        response.status_code = 202
        return {"status": "started", **answer, "model": event.model_name, "version": event.version, "run": started}

    return app


def champion_guard(registry_uri: str, mode: str = RESTORE) -> Callable[[RegistryEvent], GuardOutcome]:
    """The `guard` of `receiver_app` that checks `champion` moves in the registry at `registry_uri`
    (registry_hooks.registry.guard_champion, `mode` restore | flag). Its client is made at the
    first event: making one opens the store, and a sqlite store would be created on the spot."""
    client: list[MlflowClient] = []

    def guard(event: RegistryEvent) -> GuardOutcome:
        if not client:
            client.append(MlflowClient(registry_uri, registry_uri=registry_uri))
        return guard_champion(client[0], event.model_name, str(event.version), mode)

    return guard


class _DeliveryLog:
    """Delivery ids handled within the last `window_s` seconds (older ones are refused by their
    timestamp anyway), so a replayed delivery is recognised. Only verified deliveries get here,
    so its size is bounded by what the secret's holders send."""

    def __init__(self, window_s: float) -> None:
        self._window_s = 2 * window_s  # a delivery may be stamped up to window_s in the future too
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def claim(self, delivery_id: str) -> bool:
        """True, and remembered, if `delivery_id` was not handled recently."""
        now = time.monotonic()
        with self._lock:
            for old in [d for d, t in self._seen.items() if now - t > self._window_s]:
                del self._seen[old]
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = now
            return True

    def release(self, delivery_id: str) -> None:
        with self._lock:
            self._seen.pop(delivery_id, None)


def receiver_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8765) -> uvicorn.Config:
    """How the receiver is served: uvicorn's h11 protocol (the same parser wherever it runs,
    httptools installed or not), request heads capped at MAX_HEADER_BYTES (a larger one is a
    400 before the app runs), warnings only in the log."""
    return uvicorn.Config(app, host=host, port=port, http="h11", h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          log_level="warning")


async def _limited_body(request: Request) -> bytes:
    """The request body, or HTTP 413 as soon as it is known to exceed MAX_BODY_BYTES."""
    too_large = HTTPException(status_code=413, detail=f"The delivery body exceeds {MAX_BODY_BYTES} bytes.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def register_webhook_at(tracking_uri: str, url: str, secret: str) -> str:
    """`register_webhook` on the `mlflow server` at `tracking_uri`, named as its registry too (a
    client otherwise takes its registry URI from any set earlier in the process)."""
    return register_webhook(MlflowClient(tracking_uri, registry_uri=tracking_uri), url, secret)


def register_webhook(client: MlflowClient, url: str, secret: str, name: str = "model-audit") -> str:
    """Create (or update, when one named `name` exists) the MLflow webhook that POSTs
    model_version_alias.created events to `url`, signed with `secret`; returns its id.
    `client`'s registry URI must be an `mlflow server` with a SQL backend: only the server
    delivers webhooks."""
    if not secret:
        raise InvalidDelivery("A webhook needs a non-empty shared secret so its deliveries can be verified.")
    events = [WATCHED_EVENT]
    for existing in client.list_webhooks():
        if existing.name == name:
            return client.update_webhook(existing.webhook_id, url=url, events=events, secret=secret).webhook_id
    return client.create_webhook(name=name, url=url, events=events, secret=secret).webhook_id
