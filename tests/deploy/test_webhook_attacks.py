"""Every kind of hostile or broken request the webhook receiver may get, sent as raw bytes over
loopback to the receiver served exactly as `model-audit serve` serves it (uvicorn, h11, the
receiver_config limits): each is answered with a 4xx and starts nothing, neither an audit nor a
registry guard check. docs/reliability.md, "Webhook attacks", lists them with these ids."""

from __future__ import annotations

import json
import select
import socket
import time

import pytest

from registry_hooks.webhooks import MAX_BODY_BYTES, MAX_HEADER_BYTES, receiver_app, signature
from tests.deploy.conftest import running_receiver

SECRET = "s3cret-for-tests"
MODEL = "digits-classifier"
REPLY_TIMEOUT_S = 30
PIECE = 8 * 1024


def envelope(**changes) -> dict:
    return {"entity": "model_version_alias", "action": "created", "timestamp": "2026-11-28T00:00:00Z",
            "data": {"name": MODEL, "alias": "champion", "version": "3"}, **changes}


def signed_headers(body: bytes, delivery_id: str, secret: str = SECRET, age_s: int = 0) -> dict[str, str]:
    timestamp = str(int(time.time()) - age_s)
    return {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": timestamp,
            "X-MLflow-Signature": signature(secret, delivery_id, timestamp, body)}


def exchange(url: str, headers: dict[str, str | bytes], body=b"", method: str = "POST", path: str | None = None,
             content_length: bool = True, end_head: bool = True) -> int:
    """Send one raw HTTP/1.1 request and return the status code of the answer. `body` is bytes or
    an iterable of pieces; pieces stop going out as soon as the server has answered (it may
    refuse a request before reading it all), so an early answer is read, not lost to a reset.
    `end_head=False`: the head's closing blank line (and the body) never go out, so the server
    holds an unfinished head however the bytes arrive."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = path or "/" + url.split("//")[1].split("/", 1)[1]
    pieces = [body] if isinstance(body, bytes) else body
    head = [f"{method} {path} HTTP/1.1".encode(), f"Host: {host}:{port}".encode(), b"Connection: close"]
    for name, value in headers.items():
        head.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    if content_length and isinstance(body, bytes):
        head.append(f"Content-Length: {len(body)}".encode())
    with socket.create_connection((host, int(port)), timeout=REPLY_TIMEOUT_S) as sock:
        outgoing = [b"\r\n".join(head) + b"\r\n\r\n", *pieces] if end_head else [b"\r\n".join(head) + b"\r\n"]
        for piece in outgoing:
            if select.select([sock], [], [], 0)[0]:
                break  # answered already
            try:
                for start in range(0, len(piece), PIECE):
                    sock.sendall(piece[start:start + PIECE])
                    if select.select([sock], [], [], 0)[0]:
                        break
            except (BrokenPipeError, ConnectionResetError):
                break  # closed after answering: the answer is in our receive buffer
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 "), f"no HTTP answer: {answer[:200]!r}"
    return int(answer.split(b" ", 2)[1])


def _chunked(total: int):
    """A chunked body of `total` bytes, without its closing chunk (the server must stop before)."""
    yield f"{total:x}\r\n".encode()
    yield b" " * total


def _attacks():
    """(id, request builder, expected status). A builder gets a fresh delivery id and returns the
    keyword arguments of `exchange` (besides url)."""
    body = json.dumps(envelope()).encode()

    def signed(data: bytes, **kw):
        return lambda d: {"headers": signed_headers(data, d, **kw), "body": data}

    def edited(change):
        def build(d):
            headers = signed_headers(body, d)
            change(headers)
            return {"headers": headers, "body": body}
        return build

    deep = b"[" * 30_000 + b"]" * 30_000
    big = 20 * 1024 * 1024
    return [
        ("missing-signature-headers", lambda d: {"headers": {"Content-Type": "application/json"}, "body": body}, 401),
        ("missing-signature-only", edited(lambda h: h.pop("X-MLflow-Signature")), 401),
        ("wrong-secret", signed(body, secret="guessed-secret"), 401),
        ("truncated-signature", edited(lambda h: h.update({"X-MLflow-Signature": h["X-MLflow-Signature"][:20]})),
         401),
        ("non-ascii-signature", edited(lambda h: h.update({"X-MLflow-Signature": "v1,\u00e9\u00e9".encode("latin-1")})),
         401),
        ("other-signature-version",
         edited(lambda h: h.update({"X-MLflow-Signature": "v2," + h["X-MLflow-Signature"][3:]})), 401),
        ("body-changed-after-signing", lambda d: {"headers": signed_headers(body, d),
                                                   "body": body.replace(b'"3"', b'"4"')}, 401),
        ("stale-timestamp", signed(body, age_s=3600), 401),
        ("future-timestamp", signed(body, age_s=-3600), 401),
        ("timestamp-not-a-number", edited(lambda h: h.update({"X-MLflow-Timestamp": "yesterday"})), 401),
        ("unknown-event-unsigned", lambda d: {"headers": {"Content-Type": "application/json"},
                                              "body": json.dumps(envelope(entity="webhook", action="test")).encode()},
         401),
        ("other-model-unsigned", lambda d: {"headers": {"Content-Type": "application/json"}, "body": json.dumps(
            envelope(data={"name": "another-model", "alias": "champion", "version": "1"})).encode()}, 401),
        ("wrong-content-type", edited(lambda h: h.update({"Content-Type": "text/plain"})), 415),
        ("no-content-type", edited(lambda h: h.pop("Content-Type")), 415),
        ("body-20mb-declared", lambda d: {"headers": signed_headers(b"x", d) | {"Content-Length": str(big)},
                                          "body": (b" " * PIECE for _ in range(big // PIECE)),
                                          "content_length": False}, 413),
        ("body-over-limit-chunked", lambda d: {"headers": signed_headers(b"x", d) | {"Transfer-Encoding": "chunked"},
                                               "body": _chunked(MAX_BODY_BYTES + 1024), "content_length": False}, 413),
        # unfinished, so the HTTP parser's limit on an incomplete head applies however the bytes arrive
        ("huge-header", lambda d: {"headers": signed_headers(body, d) | {"X-Padding": "a" * (4 * MAX_HEADER_BYTES)},
                                   "end_head": False}, 400),
        ("empty-body", signed(b""), 400),
        ("invalid-utf8", signed(b'{"entity": "\xff\xfe"}'), 400),
        ("deep-json", signed(deep), 400),
        ("json-array", signed(b"[1, 2, 3]"), 400),
        ("json-missing-fields", signed(json.dumps({"entity": "model_version_alias", "action": "created"}).encode()),
         400),
        ("data-not-an-object", signed(json.dumps(envelope(data=["digits-classifier"])).encode()), 400),
        ("get-instead-of-post", lambda d: {"headers": signed_headers(b"", d), "body": b"", "method": "GET"}, 405),
        ("other-path", lambda d: {"headers": signed_headers(body, d), "body": body, "path": "/admin"}, 404),
    ]


ATTACKS = _attacks()


@pytest.fixture(scope="module")
def receiver():
    """The receiver with an on_event and a guard that only record that they were called."""
    called: list[str] = []
    app = receiver_app(SECRET, lambda event: called.append("on_event") or "run", model_name=MODEL,
                       guard=lambda event: called.append("guard"))
    with running_receiver(app) as url:
        yield url, called


@pytest.mark.parametrize("build,expected", [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_attack_is_answered_4xx_and_starts_nothing(receiver, build, expected, request):
    url, called = receiver
    assert exchange(url, **build(f"attack-{request.node.callspec.id}")) == expected
    assert called == []


def test_a_replayed_delivery_is_answered_409_and_starts_nothing_more(receiver):
    """A captured, correctly signed delivery sent again within the freshness window (older ones
    are 401 as stale): the first copy did its work, the replay does none."""
    url, called = receiver
    body = json.dumps(envelope(data={"name": MODEL, "alias": "challenger", "version": "3"})).encode()
    headers = signed_headers(body, "captured-delivery")
    assert exchange(url, headers, body) == 200  # an alias this receiver ignores: handled, nothing started
    assert exchange(url, headers, body) == 409
    assert called == []
