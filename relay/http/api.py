"""The HTTP endpoints: injection (SparkPost's and KumoMTA's schemas) and health.

=====================================  ==================================================
``POST /api/v1/transmissions``         SparkPost's Transmissions API
``POST /api/inject/v1``                KumoMTA's inject API
``GET /api/check-liveness/v1``         200 while the worker serves, 503 while it drains
``GET /api/check-readiness/v1``        200 when it accepts mail: not draining, spool
                                       below 95% of its map
``POST /u/TOKEN``                      one-click unsubscribe (RFC 8058), when
                                       ``[unsubscribe] url`` is set (``relay.http.unsubscribe``)
=====================================  ==================================================

An injection goes: API key -> tenant (401 without one); ``Idempotency-Key`` replay;
the payload rendered into one message per recipient (``relay.http.sparkpost`` /
``relay.http.kumo``, in a thread, so a 10,000-recipient request does not stall the
worker's SMTP sessions); the tenant's rate (429); every message through the intake's
stages; ONE synced commit for the whole request; then the answer. It goes out only
after that commit: a 200 means every accepted recipient's message is on disk.

Every answer carries, besides each API's own fields, the per-recipient results
(``index``, ``address``, and ``queue_id`` or an ``error`` code and ``message``): in
SparkPost's ``results.recipients``, in KumoMTA's top-level ``results``.

``Idempotency-Key`` (at most 255 printable ASCII characters): the first answer to a
tenant's key is stored with the messages, in the same commit, for 24 hours; the same
request again gets that answer (``Idempotent-Replayed: true``) and sends nothing; the
same key with a different body is a 422; while the first is still in progress in this
worker, a 409.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import trio

from relay.config import ApiKey, Config
from relay.events import EventBus
from relay.http.auth import ApiKeys
from relay.http.kumo import kumo_injection
from relay.http.payload import Injection, PayloadError, RenderedMessage
from relay.http.server import Request, Response, error_detail, error_response, json_response
from relay.http.sparkpost import sparkpost_injection
from relay.http.unsubscribe import UNSUBSCRIBE_PREFIX, OneClickUnsubscribe
from relay.intake import Admission, Intake, Refused
from relay.model import Envelope, NewMessage, Recipient
from relay.outbound.throttle import TokenBucket, rate_from_config
from relay.spool import Spool, SpoolClosed, SpoolError
from relay.spool.suppression import SuppressionList

__all__ = ["IDEMPOTENCY_TTL", "HttpApi"]

log = logging.getLogger("relay.http")

IDEMPOTENCY_TTL = 24 * 3600.0
#: Retry-After for a draining worker or a spool that cannot take the request now.
RETRY_AFTER_UNAVAILABLE = 30
#: Readiness fails above this share of the spool's map.
SPOOL_FULL_RATIO = 0.95

Schema = Literal["sparkpost", "kumo"]
_record_encode = msgspec.msgpack.Encoder().encode


class _Record(msgspec.Struct, array_like=True):
    """An idempotency record: the request's body hash and the answer it got."""

    request_sha256: bytes
    status: int
    body: bytes


_record_decode = msgspec.msgpack.Decoder(_Record).decode


class _Refusal(Exception):
    """An injection refused as a whole with this response."""

    def __init__(self, response: Response) -> None:
        self.response = response


@dataclass
class _Outcome:
    """Per recipient: the stored message, or why not."""

    index: int
    address: str
    accepted: bool = False
    #: None for a dry run (``sandbox``): nothing was stored.
    queue_id: str | None = None
    error: str | None = None
    message: str | None = None

    def as_json(self) -> dict[str, Any]:
        if self.accepted:
            return {"index": self.index, "address": self.address, "queue_id": self.queue_id}
        out: dict[str, Any] = {"index": self.index, "address": self.address,
                               "error": self.error}
        if self.message:
            out["message"] = self.message
        return out


class HttpApi:
    """One worker's HTTP application for one config (rebuilt on reload)."""

    def __init__(self, config: Config, *, intake: Intake, spool: Spool,
                 suppressions: SuppressionList, events: EventBus,
                 new_queue_id: Callable[[], str], nworkers: int,
                 draining: Callable[[], bool], ssl_context: Any = None) -> None:
        http = config.http
        self.max_body = http.max_body_bytes()
        self.request_timeout = http.request_timeout
        self.keepalive_timeout = http.keepalive_timeout
        self.max_connections = http.max_connections
        self.max_recipients = http.max_recipients
        self.ssl_context = ssl_context if http.tls else None
        self.intake = intake
        self.spool = spool
        self.new_queue_id = new_queue_id
        self.draining = draining
        self.keys = ApiKeys(http.api_keys)
        self.unsubscribe = OneClickUnsubscribe(config.unsubscribe.secret, suppressions,
                                               events) if config.unsubscribe.url else None
        # A tenant's rate is per node: each worker holds its share.
        self.buckets = {name: TokenBucket(rate / nworkers)
                        for name, t in http.tenants.items()
                        if (rate := rate_from_config(t.max_message_rate))}
        self._in_progress: set[bytes] = set()
        self.routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
            ("POST", "/api/v1/transmissions"): self._sparkpost,
            ("POST", "/api/inject/v1"): self._kumo,
            ("GET", "/api/check-liveness/v1"): self._liveness,
            ("GET", "/api/check-readiness/v1"): self._readiness,
        }

    async def handle(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        if request.path.startswith(UNSUBSCRIBE_PREFIX) and self.unsubscribe is not None:
            return await self.unsubscribe.handle(request)
        route = self.routes.get((method, request.path))
        if route is not None:
            return await route(request)
        allowed = sorted(m for m, p in self.routes if p == request.path)
        if allowed:
            return error_response(405, "Method Not Allowed", "method_not_allowed",
                                  f"{request.path} takes {', '.join(allowed)}",
                                  headers=[("allow", ", ".join(allowed))])
        return error_response(404, "Not Found", "not_found", f"no endpoint {request.path}")

    # -- health -----------------------------------------------------------------------

    async def _liveness(self, request: Request) -> Response:
        if self.draining():
            return Response(503, b"shutting down\n", "text/plain")
        return Response(200, b"OK\n", "text/plain")

    async def _readiness(self, request: Request) -> Response:
        if self.draining():
            return Response(503, b"shutting down\n", "text/plain")
        info = self.spool.env.info()
        used = (info["last_pgno"] + 1) * self.spool.env.stat()["psize"] / info["map_size"]
        if used > SPOOL_FULL_RATIO:
            return Response(503, f"spool {used:.0%} full\n".encode(), "text/plain")
        return Response(200, b"ready\n", "text/plain")

    # -- injection --------------------------------------------------------------------

    async def _sparkpost(self, request: Request) -> Response:
        return await self._inject(request, "sparkpost")

    async def _kumo(self, request: Request) -> Response:
        return await self._inject(request, "kumo")

    async def _inject(self, request: Request, schema: Schema) -> Response:
        key = await self.keys.authenticate(request.headers.get("authorization"))
        if key is None:
            return error_response(401, "Unauthorized", "unauthorized",
                                  "a valid API key is required in Authorization",
                                  headers=[("www-authenticate", 'Bearer realm="relay"')])
        if self.draining():
            return _unavailable("the relay is shutting down")
        idem = request.headers.get("idempotency-key")
        try:
            guard = self._idempotency_key(key, idem, request) if idem is not None else None
            if guard is not None:
                replay = await self._replay(*guard)
                if replay is not None:
                    return replay
                self._in_progress.add(guard[0])
            try:
                return await self._inject_once(request, key, schema, guard)
            finally:
                if guard is not None:
                    self._in_progress.discard(guard[0])
        except _Refusal as r:
            return r.response

    def _idempotency_key(self, key: ApiKey, idem: str, request: Request
                         ) -> tuple[bytes, bytes]:
        """(stored key, request hash); refuses a malformed or in-progress key."""
        if not idem or len(idem) > 255 or not idem.isascii() or not idem.isprintable():
            raise _Refusal(error_response(
                400, "Invalid Idempotency-Key", "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 255 printable ASCII characters",
                field="Idempotency-Key"))
        stored = key.tenant.encode() + b"\0" + idem.encode()
        if stored in self._in_progress:
            raise _Refusal(error_response(
                409, "Conflict", "idempotency_key_in_progress",
                "a request with this Idempotency-Key is still being processed",
                field="Idempotency-Key"))
        return stored, hashlib.sha256(request.path.encode() + b"\0" + request.body).digest()

    async def _replay(self, stored: bytes, request_hash: bytes) -> Response | None:
        raw = await trio.to_thread.run_sync(self.spool.idempotent_record, stored,
                                            time.time() - IDEMPOTENCY_TTL)
        return None if raw is None else _replayed(raw, request_hash)

    async def _inject_once(self, request: Request, key: ApiKey, schema: Schema,
                           guard: tuple[bytes, bytes] | None) -> Response:
        render = sparkpost_injection if schema == "sparkpost" else kumo_injection
        now = time.time()
        try:
            injection = await trio.to_thread.run_sync(
                lambda: render(request.body, now=now, max_recipients=self.max_recipients))
        except PayloadError as e:
            return _payload_error(schema, e)
        self._check_rate(key.tenant, len(injection.messages))
        admissions = [self._admission(request, key, injection, m, now)
                      for m in injection.messages]
        answers = await trio.to_thread.run_sync(self.intake.prepare_many, admissions)
        outcomes = _outcomes(injection, admissions, answers)
        response = _answer(schema, injection, outcomes, self.new_queue_id())
        if injection.sandbox:
            return response  # a dry run: nothing to store
        record = None
        if guard is not None:
            record = (guard[0], _record_encode(_Record(guard[1], response.status,
                                                       response.body)),
                      now - IDEMPOTENCY_TTL)
        try:
            existing = await self.intake.commit_many(admissions, answers, record)
        except SpoolClosed:
            return _unavailable("the relay is shutting down")
        except SpoolError as e:
            log.error("HTTP injection for tenant %s not stored: %s", key.tenant, e)
            return _unavailable("the spool cannot take mail now")
        if existing is not None and guard is not None:
            return _replayed(existing, guard[1])
        log.info("HTTP %s injection from %s (tenant %s): %d accepted, %d refused",
                 schema, request.client_ip, key.tenant,
                 sum(o.accepted for o in outcomes), sum(not o.accepted for o in outcomes))
        return response

    def _check_rate(self, tenant: str, count: int) -> None:
        bucket = self.buckets.get(tenant)
        if bucket is None or count == 0:
            return
        wait = bucket.take_or_wait(count)
        if wait > 0:
            raise _Refusal(error_response(
                429, "Too Many Requests", "rate_limited",
                f"tenant {tenant} is over its injection rate; retry in {wait:.1f}s",
                headers=[("retry-after", str(max(1, round(wait + 0.5))))]))

    def _admission(self, request: Request, key: ApiKey, injection: Injection,
                   msg: RenderedMessage, now: float) -> Admission:
        envelope = Envelope(
            queue_id=self.new_queue_id(), sender=injection.sender,
            recipients=[Recipient(address=msg.address)], received_at=now,
            client_ip=request.client_ip, auth_user=key.name or key.tenant,
            tls="TLS" if request.tls else None,
            protocol="HTTPS" if request.tls else "HTTP",
            tenant=key.tenant, campaign_id=injection.campaign_id,
            metadata=msg.metadata or None, tags=msg.tags or None,
            ip_pool=injection.ip_pool, transactional=injection.transactional,
            body=None if msg.data.isascii() else "8BITMIME", declared_size=len(msg.data),
            smtputf8=not (msg.address.isascii() and injection.sender.isascii()),
        )
        return Admission(envelope=envelope, data=msg.data, via="http")


def _unavailable(why: str) -> Response:
    return error_response(503, "Service Unavailable", "unavailable", why,
                          headers=[("retry-after", str(RETRY_AFTER_UNAVAILABLE))])


def _payload_error(schema: Schema, e: PayloadError) -> Response:
    detail = error_detail(e.message, e.code, e.description, e.field)
    if schema == "sparkpost":
        return json_response(e.status, {"errors": [detail]})
    return json_response(e.status, {"success_count": 0, "fail_count": 0,
                                    "failed_recipients": [], "errors": [e.description],
                                    "error_details": [detail]})


def _replayed(raw: bytes, request_hash: bytes) -> Response:
    record = _record_decode(raw)
    if record.request_sha256 != request_hash:
        return error_response(
            422, "Idempotency-Key reused", "idempotency_key_reused",
            "this Idempotency-Key was used for a different request in the last 24 hours",
            field="Idempotency-Key")
    return Response(record.status, record.body, headers=[("idempotent-replayed", "true")])


def _outcomes(injection: Injection, admissions: list[Admission],
              answers: list[NewMessage | Refused]) -> list[_Outcome]:
    """Every recipient of the request, in request order, with what became of it."""
    outcomes = [_Outcome(f.index, f.address, error=f.code, message=f.message)
                for f in injection.failures]
    for msg, admission, answer in zip(injection.messages, admissions, answers, strict=True):
        if isinstance(answer, Refused):
            outcomes.append(_Outcome(msg.index, msg.address, error="refused",
                                     message=str(answer.reply)))
        elif not answer.envelope.recipients:
            outcomes.append(_Outcome(msg.index, msg.address, error="suppressed",
                                     message="the address is on the suppression list"))
        else:
            outcomes.append(_Outcome(
                msg.index, msg.address, accepted=True,
                queue_id=None if injection.sandbox else admission.envelope.queue_id))
    outcomes.sort(key=lambda o: o.index)
    return outcomes


def _answer(schema: Schema, injection: Injection, outcomes: list[_Outcome],
            request_id: str) -> Response:
    accepted = [o for o in outcomes if o.accepted]
    refused = [o for o in outcomes if not o.accepted]
    per_recipient = [o.as_json() for o in outcomes]
    if schema == "kumo":
        body: dict[str, Any] = {
            "success_count": len(accepted), "fail_count": len(refused),
            "failed_recipients": [o.address for o in refused],
            "errors": [f"recipients[{o.index}]: {o.message or o.error}" for o in refused],
            "results": per_recipient,
        }
        return json_response(200 if accepted else 422, body)
    if not accepted:
        return json_response(422, {"errors": [error_detail(
            "No valid recipients", "no_valid_recipients",
            "every recipient was refused; see results.recipients")],
            "results": {"total_accepted_recipients": 0,
                        "total_rejected_recipients": len(refused),
                        "recipients": per_recipient}})
    results: dict[str, Any] = {
        "total_rejected_recipients": len(refused),
        "total_accepted_recipients": len(accepted), "id": request_id,
        "recipients": per_recipient,
    }
    if injection.sandbox:
        results["sandbox"] = True
    if refused:
        results["rcpt_to_errors"] = [
            {"message": o.error, "code": o.error, "description": o.message or o.error}
            for o in refused]
    return json_response(200, {"results": results})
