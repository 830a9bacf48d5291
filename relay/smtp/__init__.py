"""Sans-I/O SMTP: the server state machine, replies, address and parameter parsing.

No sockets, clocks, threads or files here (see ``relay.smtp.server`` for the driving loop).
"""

from relay.smtp.address import (
    AddressError,
    Mailbox,
    ParamError,
    format_orcpt,
    parse_mailbox,
    parse_notify,
    parse_orcpt,
    parse_params,
    parse_path,
    split_path,
    xtext_decode,
    xtext_encode,
)
from relay.smtp.events import (
    NEED_DATA,
    AuthRequested,
    ConnectionClosing,
    Event,
    HeloReceived,
    MessageReceived,
    NeedData,
    RecipientRequested,
    StartTLSRequested,
)
from relay.smtp.replies import Reply, ReplyParseError, parse_reply
from relay.smtp.server import LocalProtocolError, Phase, ServerConnection, ServerSettings

__all__ = [
    "NEED_DATA",
    "AddressError",
    "AuthRequested",
    "ConnectionClosing",
    "Event",
    "HeloReceived",
    "LocalProtocolError",
    "Mailbox",
    "MessageReceived",
    "NeedData",
    "ParamError",
    "Phase",
    "RecipientRequested",
    "Reply",
    "ReplyParseError",
    "ServerConnection",
    "ServerSettings",
    "StartTLSRequested",
    "format_orcpt",
    "parse_mailbox",
    "parse_notify",
    "parse_orcpt",
    "parse_params",
    "parse_path",
    "parse_reply",
    "split_path",
    "xtext_decode",
    "xtext_encode",
]
