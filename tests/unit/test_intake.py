"""The intake's stages: order, what each adds or refuses, no I/O."""

from __future__ import annotations

import pytest

from relay.config import Config, InboundConfig
from relay.intake import Admission, Intake, MessageId, Refused, default_stages
from relay.model import Envelope, Recipient

BODY = b"Subject: hi\r\nFrom: a@sender.test\r\n\r\nbody\r\n"


def admission(data: bytes = BODY, via: str = "smtp") -> Admission:
    env = Envelope(queue_id="QID1", sender="a@sender.test", received_at=1_000_000.0,
                   recipients=[Recipient(address="b@dest.test")], client_ip="192.0.2.7",
                   protocol="ESMTPS", tls="TLSv1.3 TLS_AES_128_GCM_SHA256")
    return Admission(envelope=env, data=data, via=via, helo="client.test")  # type: ignore[arg-type]


def intake(max_hops: int = 50) -> Intake:
    config = Config(inbound=InboundConfig(max_hops=max_hops))
    stand_in: object = object()  # writer and events: prepare never touches them
    return Intake(default_stages(config, "relay.test"), stand_in, stand_in)  # type: ignore[arg-type]


def test_trace_headers_go_on_top_in_order_and_the_body_is_untouched() -> None:
    stored = intake().prepare(admission())
    head, _, rest = stored.data.partition(b"Subject: hi")
    assert b"Subject: hi" + rest == BODY
    lines = head.decode().split("\r\n")
    assert lines[0] == "Received: from client.test ([192.0.2.7])"
    assert lines[1] == "\t(using TLSv1.3 TLS_AES_128_GCM_SHA256)"
    assert lines[2] == "\tby relay.test (relay) with ESMTPS id QID1"
    assert lines[3].startswith("\tfor <b@dest.test>; ")
    assert lines[4] == "Message-ID: <QID1@relay.test>"


def test_a_message_id_is_kept_and_dsns_get_no_received_line() -> None:
    stored = intake().prepare(admission(b"Message-ID: <x@y>\r\n" + BODY, via="dsn"))
    assert stored.data == b"Message-ID: <x@y>\r\n" + BODY


@pytest.mark.parametrize(("received", "refused"), [(3, False), (4, True)])
def test_the_loop_check_counts_received_and_delivered_to(received: int, refused: bool) -> None:
    data = b"Received: x\r\n" * received + b"delivered-to: me@x\r\n" + BODY
    if refused:
        with pytest.raises(Refused) as info:
            intake(max_hops=4).prepare(admission(data))
        assert str(info.value.reply) == "554 5.4.6 Error: too many hops"
    else:
        assert intake(max_hops=4).prepare(admission(data)).data.endswith(data)


def test_a_stage_is_one_small_class() -> None:
    class Tag:
        def admit(self, msg: Admission) -> None:
            msg.head.append(b"X-Tag: yes\r\n")

    pipeline = intake()
    pipeline.stages.insert(1, Tag())
    data = pipeline.prepare(admission()).data
    assert data.index(b"X-Tag: yes") < data.index(b"Received:")
    assert isinstance(pipeline.stages[-1], MessageId)


def tagging_intake(strip: bool) -> Intake:
    config = Config(inbound=InboundConfig(tenant_header="X-Tenant",
                                          campaign_header="X-Campaign",
                                          strip_tag_headers=strip))
    stand_in: object = object()
    return Intake(default_stages(config, "relay.test"), stand_in, stand_in)  # type: ignore[arg-type]


@pytest.mark.parametrize("strip", [True, False])
def test_tag_headers_tag_smtp_mail_and_are_stripped_by_config(strip: bool) -> None:
    data = (b"X-Tenant: acme\r\nSubject: hi\r\nx-campaign: spring\r\n\tsale\r\n"
            b"From: a@sender.test\r\n\r\nX-Tenant: body text stays\r\n")
    stored = tagging_intake(strip).prepare(admission(data))
    assert stored.envelope.tenant == "acme"
    assert stored.envelope.campaign_id == "spring sale"
    assert stored.data.endswith(b"\r\n\r\nX-Tenant: body text stays\r\n")
    header = stored.data.partition(b"\r\n\r\n")[0]
    assert (b"X-Tenant: acme" in header) is not strip
    assert (b"x-campaign" in header) is not strip
    assert b"Subject: hi\r\n" in header and b"From: a@sender.test" in header


def test_tag_headers_are_ignored_on_http_and_dsn_mail() -> None:
    data = b"X-Tenant: forged\r\n" + BODY
    stored = tagging_intake(True).prepare(admission(data, via="dsn"))
    assert stored.envelope.tenant is None and stored.data.endswith(data)
