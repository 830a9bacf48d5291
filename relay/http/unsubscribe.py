"""The one-click unsubscribe endpoint (RFC 8058) on the HTTP listener: ``/u/TOKEN``.

* ``POST /u/TOKEN`` with the body ``List-Unsubscribe=One-Click`` (form-encoded or
  multipart, as mailbox providers send it): a token the relay made (``read_token``)
  puts its recipient on its tenant's suppression list for campaign mail (SparkPost's
  ``non_transactional``; receipts still go), durably, before the 200, and records an
  ``Unsubscribe`` event. Gmail wants unsubscribes honoured within 48 hours; these hold
  for the next message. Repeating it changes nothing and answers 200 again.
* A token the relay did not make: 400, nothing changes.
* ``GET /u/TOKEN``: a page with a button that POSTs, never an unsubscribe by itself (link
  scanners and previews follow GET links; RFC 8058 section 3.2).

No API key: the token is the authorisation.
"""

from __future__ import annotations

import html
import logging
import time

import trio

from relay.events import EventBus, Unsubscribe
from relay.http.server import Request, Response, error_response, json_response
from relay.intake.unsubscribe import read_token
from relay.spool.suppression import Suppression, SuppressionList

__all__ = ["UNSUBSCRIBE_PREFIX", "OneClickUnsubscribe"]

log = logging.getLogger("relay.http")

UNSUBSCRIBE_PREFIX = "/u/"
_ONE_CLICK = b"List-Unsubscribe=One-Click"


class OneClickUnsubscribe:
    def __init__(self, secret: str, suppressions: SuppressionList, events: EventBus) -> None:
        self.secret = secret.encode()
        self.suppressions = suppressions
        self.events = events

    async def handle(self, request: Request) -> Response:
        token = read_token(self.secret, request.path[len(UNSUBSCRIBE_PREFIX):])
        if token is None:
            return error_response(400, "Bad Request", "invalid_token",
                                  "this unsubscribe link is not valid")
        if request.method in ("GET", "HEAD"):
            return Response(200, _page(request.path, token.recipient), "text/html; charset=utf-8")
        if request.method != "POST":
            return error_response(405, "Method Not Allowed", "method_not_allowed",
                                  headers=[("allow", "GET, POST")])
        if _ONE_CLICK not in request.body:
            return error_response(400, "Bad Request", "not_one_click",
                                  "the body must carry List-Unsubscribe=One-Click (RFC 8058)")
        entry = Suppression(address=token.recipient, tenant=token.tenant,
                            source="unsubscribe", time=time.time(),
                            transactional=False, non_transactional=True,
                            description=f"campaign {token.campaign}" if token.campaign else "")
        await trio.to_thread.run_sync(self.suppressions.add, [entry])
        self.events.emit(Unsubscribe(queue_id="", recipient=token.recipient,
                                     tenant=token.tenant or None,
                                     campaign_id=token.campaign or None,
                                     client_ip=request.client_ip))
        log.info("unsubscribe: %s from tenant %r (campaign %r)", token.recipient,
                 token.tenant, token.campaign)
        return json_response(200, {"results": {"unsubscribed": token.recipient}})


def _page(path: str, recipient: str) -> bytes:
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>Unsubscribe</title></head>"
        f"<body><form method=post action=\"{html.escape(path)}\">"
        "<input type=hidden name=List-Unsubscribe value=One-Click>"
        f"<p>Unsubscribe {html.escape(recipient)}?</p>"
        "<button type=submit>Unsubscribe</button></form></body></html>"
    ).encode()
