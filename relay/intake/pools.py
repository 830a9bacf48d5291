"""The egress pool of a message (``[egress]``), chosen once at intake.

In order: the pool the message names (the HTTP API's ``options.ip_pool``, or the
``egress.pool_header`` field of an SMTP message, PowerMTA's ``X-VirtualMTA``), its
tenant's pool (``egress.tenant_pools``), the default pool. The header is removed before
the message is stored, so it never reaches a receiver. A named pool that does not exist
refuses the message (550 5.7.1): sending it from some other pool's addresses would put
the wrong reputation on it. The relay's own DSNs take the default pool.
"""

from __future__ import annotations

from relay.config import EgressConfig
from relay.intake.admission import Admission, Refused
from relay.intake.headers import field_value, without_fields
from relay.smtp.replies import Reply

__all__ = ["PoolChoice"]


class PoolChoice:
    def __init__(self, egress: EgressConfig) -> None:
        self.pools = set(egress.pools)
        self.default = egress.default_pool
        self.tenants = dict(egress.tenant_pools)
        self.header = egress.pool_header.lower().encode() or None

    def admit(self, msg: Admission) -> None:
        env = msg.envelope
        named = env.ip_pool if msg.via != "dsn" else None
        if msg.via == "smtp" and self.header is not None:
            value = field_value(msg.data, msg.fields, self.header)
            if value is not None:
                msg.replace_data(without_fields(msg.data, [self.header]))
                named = named or value
        if named and named not in self.pools:
            raise Refused(Reply(550, "5.7.1", f"unknown IP pool {named[:64]!r}"))
        env.ip_pool = named or self.tenants.get(env.tenant or "", self.default)
