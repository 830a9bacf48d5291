"""The hand-made seeds of the fuzz corpus: real conversations in the targets' input formats.

``python -m tests.fuzz --write-seeds`` (re)writes them as ``tests/fuzz/corpus/<target>/
seed-<name>``; libFuzzer's own additions (named by their SHA-1) sit next to them.
``seed-conf-*`` are snapshots of conf/*.toml (the config fuzzer also reads conf/ itself).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tests.fuzz.targets import (
    C_BEHIND,
    C_QUIT,
    C_STARTTLS,
    D_BOUNCE,
    D_DELAY_DEFAULT,
    D_DELAYED,
    D_HOP,
    D_SMALL_FULL,
    D_SMTPUTF8,
    S_AUTH_ENABLED,
    S_LARGE,
    S_NORMALIZE,
    S_PLAINTEXT_AUTH,
    S_PREGREET,
    S_TLS_ACTIVE,
    S_TLS_AVAILABLE,
    S_TLS_FAIL,
    client_input,
    dsn_input,
    server_input,
)

ROOT = Path(__file__).resolve().parent.parent.parent

# -- server: what clients send ------------------------------------------------------------

_BODY = (b"From: a@example.com\r\nTo: b@example.net\r\nSubject: test\r\n\r\n"
         b"Hello\r\n..a dot-stuffed line\r\n.\r\n")
_PLAIN = base64.b64encode(b"\0app1\0s3cret")
_PLAIN_AUTHZ = base64.b64encode(b"admin\0app1\0s3cret")

SERVER_SESSIONS: dict[str, bytes] = {
    "simple": (b"EHLO client.example\r\nMAIL FROM:<a@example.com>\r\n"
               b"RCPT TO:<b@example.net>\r\nDATA\r\n" + _BODY + b"QUIT\r\n"),
    "helo": (b"HELO client.example\r\nMAIL FROM:<a@example.com> SIZE=10\r\n"
             b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
             b".\r\nVRFY b\r\nEXPN list\r\nHELP\r\nNOOP\r\nRSET\r\nQUIT\r\n"),
    "pipelining": (b"EHLO client.example\r\n"
                   b"MAIL FROM:<a@example.com> SIZE=120 BODY=8BITMIME\r\n"
                   b"RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\n"
                   b"RCPT TO:<\"d e\"@example.net>\r\nDATA\r\n" + _BODY +
                   b"MAIL FROM:<> BODY=7BIT\r\nRCPT TO:<postmaster>\r\nDATA\r\n"
                   b"Subject: 2\r\n\r\n\xc3\xa9\r\n.\r\nRSET\r\nQUIT\r\n"),
    "bdat": (b"EHLO client.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
             b"BDAT 12\r\nSubject: x\r\nBDAT 9 LAST\r\n\r\nbody\r\n\r\n"
             b"MAIL FROM:<a@example.com> BODY=BINARYMIME\r\nRCPT TO:<b@example.net>\r\n"
             b"BDAT 6 LAST\r\n\x00\r\r\n\xff\nDATA\r\n"
             b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
             b"BDAT 0 LAST\r\nBDAT 5\r\nRSET\r\nQUIT\r\n"),
    "bdat-fail": (b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
                  b"BDAT 99999\r\n" + b"x" * 300 + b"\r\nBDAT 3 LAST\r\nabcBDAT x\r\n"
                  b"BDAT 2\r\nDATA\r\nQUIT\r\n"),
    "auth-plain": (b"EHLO client.example\r\nAUTH PLAIN " + _PLAIN + b"\r\n"
                   b"MAIL FROM:<a@example.com> AUTH=<>\r\nRCPT TO:<b@example.org>\r\n"
                   b"DATA\r\n" + _BODY + b"AUTH PLAIN\r\nQUIT\r\n"),
    "auth-login": (b"EHLO client.example\r\nAUTH LOGIN\r\n" + base64.b64encode(b"app1")
                   + b"\r\n" + base64.b64encode(b"s3cret") + b"\r\n"
                   b"AUTH LOGIN " + base64.b64encode(b"app1") + b"\r\n*\r\n"
                   b"AUTH PLAIN =\r\nAUTH PLAIN\r\n" + _PLAIN_AUTHZ + b"\r\n"
                   b"AUTH CRAM-MD5\r\nAUTH PLAIN !!!\r\nQUIT\r\n"),
    "starttls": (b"EHLO client.example\r\nSTARTTLS\r\nMAIL FROM:<injected@example.com>\r\n"
                 b"EHLO client.example\r\nAUTH PLAIN " + _PLAIN + b"\r\n"
                 b"STARTTLS\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
                 b"DATA\r\n" + _BODY + b"QUIT\r\n"),
    "dsn": (b"EHLO client.example\r\n"
            b"MAIL FROM:<bounce@example.com> RET=HDRS ENVID=QQ314159+2Bx SIZE=500\r\n"
            b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40example.net\r\n"
            b"RCPT TO:<c@example.net> NOTIFY=NEVER\r\n"
            b"RCPT TO:<d@example.net> NOTIFY=DELAY ORCPT=utf-8;d+2Bx@example.net\r\n"
            b"RCPT TO:<e@example.net> NOTIFY=NEVER,SUCCESS\r\n"
            b"DATA\r\n" + _BODY + b"MAIL FROM:<x@example.com> RET=FULL RET=HDRS\r\nQUIT\r\n"),
    "smtputf8": ("EHLO client.example\r\nMAIL FROM:<s\u00e9nder@ex\u00e4mple.com> SMTPUTF8 "
                 "BODY=8BITMIME\r\nRCPT TO:<\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a>\r\n"
                 "DATA\r\nSubject: \u00e9\r\n\r\n\u00e9\r\n.\r\n"
                 "MAIL FROM:<\u00e9@example.com>\r\nQUIT\r\n").encode(),
    "addresses": (b"EHLO c\r\nMAIL FROM: <@a.example,@b.example:a@c.example>\r\n"
                  b"RCPT TO:<user@[192.0.2.1]>\r\nRCPT TO:<user@[IPv6:2001:db8::1]>\r\n"
                  b"RCPT TO:<\"quoted>\\\"local\"@example.net>\r\nRCPT TO:<user%h@example.net>\r\n"
                  b"RCPT TO:<x@tag:y>\r\nRCPT TO:<PostMaster>\r\nRCPT TO:b@example.net\r\n"
                  b"RCPT TO:<b@example.net> FOO=bar\r\nRCPT TO:<>\r\nDATA\r\n.\r\nQUIT\r\n"),
    "errors": (b"GARBAGE\r\n\r\nEHLO\r\nMAIL FROM:<a@b.example>\r\nEHLO c\r\n"
               b"RCPT TO:<x@y.example>\r\nDATA\r\nMAIL FROM:<a@b.example>\r\nDATA\r\n"
               b"MAIL FROM:<a@b.example>\r\nbare LF\nbare CR\r\r\n" + b"L" * 600 +
               b"\r\nNOOP\r\nDATA extra\r\nRSET x\r\nSTARTTLS x\r\nQUIT\r\n"),
    "smuggling": (b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
                  b"Subject: x\r\n\r\nbody\n.\nMAIL FROM:<evil@x.example>\n.\r\n"
                  b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
                  b"body\r\n.\rMAIL FROM:<evil@x.example>\r\n.\r\nQUIT\r\n"),
    "too-big": (b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=999999999999\r\n"
                b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
                + b"0123456789abcdef" * 40 + b"\r\n.\r\n"
                b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nBDAT 5000 LAST\r\n"
                + b"y" * 50 + b"\r\nQUIT\r\n"),
    "long-line": (b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
                  + b"z" * 1200 + b"\r\n.\r\nQUIT\r\n"),
    "http": b"GET / HTTP/1.1\r\nHost: relay.example\r\n\r\n",
    "many-rcpts": (b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n"
                   + b"".join(b"RCPT TO:<r%d@d.example>\r\n" % i for i in range(102))
                   + b"DATA\r\nSubject: many\r\n\r\n.\r\nQUIT\r\n"),
    "params-sizes": (b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=\r\nMAIL FROM:<a@b.example> SIZE\r\n"
                     b"MAIL FROM:<a@b.example> SIZE=1x\r\nMAIL FROM:<a@b.example> BODY=X\r\n"
                     b"MAIL FROM:<a@b.example> SMTPUTF8=1\r\nMAIL FROM:<a@b.example> ENVID=\r\n"
                     b"MAIL FROM:<a@b.example> ENVID=+ZZ\r\nMAIL FROM:<a@b.example> AUTH\r\n"
                     b"MAIL FROM:<a@b.example> size=7 Size=8\r\n"
                     + "MAIL FROM:<a@b.example> SIZE=\u00b2\r\n".encode()
                     + "MAIL FROM:<a@b.example> SIZE=\u0663\r\nQUIT\r\n".encode()),
}

#: name -> (session, fuzz_server keyword arguments)
SERVER_SEEDS: dict[str, tuple[bytes, dict[str, object]]] = {
    **{name: (s, {}) for name, s in SERVER_SESSIONS.items()},
    "simple-bytewise": (SERVER_SESSIONS["simple"], {"chunks": [1]}),
    "pipelining-chunked": (SERVER_SESSIONS["pipelining"], {"chunks": [7, 3, 50, 200]}),
    "bdat-chunked": (SERVER_SESSIONS["bdat"], {"chunks": [2, 13, 5]}),
    "starttls-fail": (SERVER_SESSIONS["starttls"], {"flags": S_TLS_AVAILABLE | S_TLS_FAIL}),
    "starttls-split": (SERVER_SESSIONS["starttls"], {"chunks": [30, 10]}),
    "auth-plaintext": (SERVER_SESSIONS["auth-plain"],
                       {"flags": S_AUTH_ENABLED | S_PLAINTEXT_AUTH, "auth_mask": 0b10}),
    "auth-tls": (SERVER_SESSIONS["auth-login"],
                 {"flags": S_AUTH_ENABLED | S_TLS_ACTIVE, "auth_mask": 0b0101}),
    "auth-disabled": (SERVER_SESSIONS["auth-plain"], {"flags": 0}),
    "rejects": (SERVER_SESSIONS["pipelining"],
                {"rcpt_mask": 0b0110, "store_mask": 0b01, "max_errors": 5}),
    "pregreet": (SERVER_SESSIONS["simple"], {"flags": S_PREGREET, "chunks": [5]}),
    "too-big-small": (SERVER_SESSIONS["too-big"], {"size_sel": 7}),
    "too-big-large": (SERVER_SESSIONS["too-big"], {"flags": S_LARGE}),
    "long-line-limit": (SERVER_SESSIONS["long-line"], {"line_sel": 255}),
    "drain": (SERVER_SESSIONS["pipelining"], {"drain_at": 2, "chunks": [40]}),
    "race": (SERVER_SESSIONS["dsn"], {"race_at": 3}),
    "many-rcpts-limit": (SERVER_SESSIONS["many-rcpts"], {"max_recipients": 1}),
    "smuggling-normalize": (SERVER_SESSIONS["smuggling"],
                            {"flags": S_TLS_AVAILABLE | S_AUTH_ENABLED | S_NORMALIZE}),
    "errors-normalize": (SERVER_SESSIONS["errors"], {"flags": S_NORMALIZE}),
    "bdat-normalize": (SERVER_SESSIONS["bdat"], {"flags": S_NORMALIZE, "size_sel": 3}),
}

# -- client: what servers answer ----------------------------------------------------------

_EHLO_FULL = (b"250-mx.example.net Hello\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
              b"250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250-SMTPUTF8\r\n"
              b"250-STARTTLS\r\n250 HELP\r\n")
_EHLO_CHUNKING = (b"250-mx.example.net\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n"
                  b"250-SIZE\r\n250 DSN\r\n")
_GREETING = b"220 mx.example.net ESMTP\r\n"
_TXN_OK = (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
           b"250 2.0.0 Ok: queued as 4XyZ\r\n")
_TXN2_OK = (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n"
            b"250 2.0.0 Ok: queued\r\n")

CLIENT_SEEDS: dict[str, tuple[bytes, dict[str, object]]] = {
    "pipelined": (_GREETING + _EHLO_FULL.replace(b"250-STARTTLS\r\n", b"") + _TXN_OK
                  + b"221 2.0.0 Bye\r\n", {"flags": C_QUIT}),
    "pipelined-2rcpt": (_GREETING + _EHLO_FULL + _TXN2_OK + _TXN2_OK,
                        {"transactions": 2, "recipients": [0, 1]}),
    "chunking": (_GREETING + _EHLO_CHUNKING + b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
                 b"550 5.1.1 <other@example.net>: no such user\r\n"
                 b"250 2.0.0 Ok: 42 octets\r\n",
                 {"recipients": [0, 1, 2], "envelope": 2}),
    "chunking-failed": (_GREETING + _EHLO_CHUNKING + b"550 5.7.1 sender refused\r\n"
                        b"554 5.5.1 no valid recipients\r\n554 5.5.1 no valid recipients\r\n"
                        b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n",
                        {"transactions": 2}),
    "no-pipelining": (_GREETING + b"250-mx.example.net\r\n250 8BITMIME\r\n" + _TXN2_OK,
                      {"recipients": [0, 1]}),
    "helo-fallback": (_GREETING + b"502 5.5.2 EHLO not understood\r\n250 mx.example.net\r\n"
                      + _TXN_OK, {"data": 3, "envelope": 2}),
    "starttls": (_GREETING + _EHLO_FULL + b"220 2.0.0 Ready to start TLS\r\n"
                 + _EHLO_FULL.replace(b"250-STARTTLS\r\n", b"") + _TXN_OK,
                 {"flags": C_STARTTLS}),
    "starttls-refused": (_GREETING + _EHLO_FULL + b"454 4.7.0 TLS not available\r\n" + _TXN_OK,
                         {"flags": C_STARTTLS}),
    "starttls-injection": (_GREETING + _EHLO_FULL + b"220 2.0.0 Ready\r\n250 injected\r\n",
                           {"flags": C_STARTTLS}),
    "behind": (_GREETING + _EHLO_FULL.replace(b"250-STARTTLS\r\n", b"") + _TXN_OK
               + _TXN_OK + _TXN_OK + b"221 Bye\r\n",
               {"flags": C_BEHIND | C_QUIT, "transactions": 3, "chunks": [40, 90]}),
    "rcpt-failures": (_GREETING + _EHLO_FULL + b"250 2.1.0 Ok\r\n"
                      b"550-5.1.1 The email account that you tried to reach does not exist.\r\n"
                      b"550 5.1.1 Please try again.\r\n451 4.7.1 greylisted\r\n"
                      b"452 4.5.3 Too many recipients\r\n354 go\r\n"
                      b"552 5.3.4 message too big\r\n",
                      {"recipients": [0, 1, 2, 3 | 8, 4 | 32]}),
    "data-refused": (_GREETING + _EHLO_FULL + b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
                     b"554 5.5.1 no valid recipients\r\n"
                     b"250 2.0.0 reset\r\n" + _TXN_OK, {"transactions": 2}),
    "421-midway": (_GREETING + _EHLO_FULL + b"250 2.1.0 Ok\r\n"
                   b"421 4.7.0 mx.example.net closing connection\r\n", {"recipients": [0, 1]}),
    "greeting-refused": (b"554 5.7.1 go away\r\n", {}),
    "size-limit": (_GREETING + b"250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n" + _TXN_OK,
                   {"data": 5}),
    "size-weird": (_GREETING + b"250-mx\r\n250-SIZE 00000000000000000000000001\r\n"
                   b"250-SIZE\r\n250-size -5\r\n250 SIZE \xc2\xb2\r\n" + _TXN_OK, {}),
    "utf8-needed": (_GREETING + b"250-mx\r\n250 PIPELINING\r\n" + _TXN_OK,
                    {"sender": 2, "envelope": 4, "recipients": [2]}),
    "bad-addresses": (_GREETING + _EHLO_FULL + _TXN2_OK, {"sender": 4, "recipients": [4, 0]}),
    "malformed": (_GREETING + b"250-mx\r\n251 mixed codes\r\n", {}),
    "malformed-2": (_GREETING + b"hello there\r\n", {}),
    "unsolicited": (_GREETING + _EHLO_FULL + b"250 2.0.0 unsolicited\r\n", {}),
    "dot-discard": (_GREETING + _EHLO_FULL + b"250 2.1.0 Ok\r\n550 5.1.1 no\r\n354 go\r\n"
                    b"554 5.5.1 no valid recipients\r\n", {}),
    "bytewise": (_GREETING + _EHLO_FULL + _TXN_OK, {"chunks": [1]}),
    "dsn-params": (_GREETING + _EHLO_FULL + _TXN2_OK,
                   {"envelope": 8 | 2, "envid": 3, "recipients": [1 | 16 | 32, 0 | 8 | 96]}),
}

# -- address: text as found in commands ---------------------------------------------------

ADDRESS_SEEDS: dict[str, str] = {
    "path": "<user@example.com>",
    "path-route": "<@a.example,@b.example:user@c.example>",
    "path-quoted": '<"john \\"q\\" doe"@example.com>',
    "path-ipv4": "<user@[192.0.2.1]>",
    "path-ipv6": "<user@[IPv6:2001:db8::1]>",
    "path-tag": "<user@[x-tag:some.thing]>",
    "path-postmaster": "<PostMaster>",
    "path-null": "<>",
    "path-utf8": "<\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a>",
    "path-params": "<a@b.example> SIZE=1000 BODY=8BITMIME",
    "mailbox": "user.name+tag@sub-domain.example.com",
    "mailbox-routing": "user%other@example.net",
    "params": "SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=QQ+2B314 SMTPUTF8",
    "params-dup": "size=1 SIZE=2",
    "notify": "SUCCESS,FAILURE,DELAY",
    "notify-never": "never",
    "orcpt": "rfc822;user+40example.com",
    "orcpt-utf8": "utf-8;\u00fcser@example.com",
    "xtext": "+2B+3D+C3+A9abc",
    "xtext-bad": "+C3+28",
    "superscript": "<a@b> SIZE=\u00b2",
    "surrogates": "<a\udcff@b.example>",
}

# -- replies: lines of one reply (byte 0: bit 0 enhanced, bit 1 NUL-separated) ------------

REPLY_SEEDS: dict[str, bytes] = {
    "ehlo": b"\x01250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME",
    "enhanced": b"\x01550 5.1.1 <x@example.net>: Recipient address rejected",
    "enhanced-multi": b"\x01550-5.7.1 one\r\n550-5.7.1\r\n550 5.7.1 three",
    "plain": b"\x00220 mx.example.net ESMTP",
    "class-mismatch": b"\x01250 5.0.0 weird",
    "nul-split": b"\x03421-4.7.0 a\r\n b\x00421 4.7.0 c",
    "bare-code": b"\x01354",
    "size-superscript": b"\x01250-mx\r\n250 SIZE \xc2\xb2",
    "bad": b"\x01abc\r\n25",
}

# -- dsn ----------------------------------------------------------------------------------

_ORIG = (b"Received: from c.example by relay.example\r\nFrom: a@example.com\r\n"
         b"To: b@example.net\r\nSubject: hello\r\nMessage-ID: <1@example.com>\r\n\r\n"
         b"Body line\r\n.\r\n")

DSN_SEEDS: dict[str, bytes] = {
    "failed": dsn_input(_ORIG),
    "failed-full": dsn_input(_ORIG, ret=1, recipients=[0, 1 | 8, 2 | 32],
                             failures=[(0, 5, 1, 1), (1, 4, 2, 2), (2, 0, 0, 0)]),
    "delayed": dsn_input(_ORIG, flags=D_HOP | D_DELAYED | D_DELAY_DEFAULT,
                         failures=[(0, 4, 4, 7)]),
    "delayed-notify": dsn_input(_ORIG, flags=D_HOP | D_DELAYED, recipients=[3 << 3 | 1],
                                failures=[(0, 4, 4, 1)]),
    "never": dsn_input(_ORIG, recipients=[1 << 3], failures=[(0, 5, 1, 1)]),
    "local": dsn_input(_ORIG, flags=0, diagnostic=b"mail for example.net loops back"),
    "utf8": dsn_input("Subject: \u00e9t\u00e9\r\n\r\n\u00e9\r\n".encode(),
                      flags=D_HOP | D_SMTPUTF8, ret=1, sender=2, recipients=[1, 6],
                      failures=[(0, 5, 1, 1), (1, 2, 1, 2)], mta=3, envid=2),
    "too-big-full": dsn_input(_ORIG + b"x" * 100 + b"\r\n", flags=D_HOP | D_SMALL_FULL, ret=3),
    "no-body": dsn_input(b"Subject: only headers", ret=1),
    "null-sender": dsn_input(_ORIG, sender=1),
    "bounce": dsn_input(_ORIG, flags=D_HOP | D_BOUNCE),
    "long-diagnostic": dsn_input(_ORIG, diagnostic=b"550 5.7.1 " + b"blocked " * 60,
                                 sender=4),
    "long-names": dsn_input(_ORIG, diagnostic=b"550 5.1.1 unknown", recipients=[3], mta=1,
                            sender=4),
    "bad-index": dsn_input(_ORIG, failures=[(7, 5, 1, 1), (1, 5, 1, 1)]),
}

# -- config -------------------------------------------------------------------------------

CONFIG_SEEDS: dict[str, bytes] = {
    "empty": b"",
    "sizes": b'[inbound]\nmax_message_size = "25MiB"\nmax_recipients = 500\n'
             b'[spool]\nmap_size = "1GiB"\ncommit_window = 0.002\n',
    "throttles": (b'[outbound.default]\nmax_message_rate = "600/min"\n'
                  b'max_connection_rate = "5/10s"\ntls = "required"\n\n'
                  b'[outbound.domains."*.example.com"]\nmax_connections = 2\n\n'
                  b'[outbound.domains."gmail.com"]\nmax_message_rate = "10/s"\nmx_rollup = true\n'),
    "routes": (b'[outbound]\nsmart_host = "[::1]:2526"\nresolvers = ["127.0.0.1:5353"]\n'
               b'[[outbound.routes]]\ndomain = "*.example.net"\n'
               b'hosts = ["10.0.0.5:25", "mx.example.net"]\n'),
    "auth": (b'[inbound]\nallow_plaintext_auth = true\ntls_cert = "c.pem"\ntls_key = "k.pem"\n'
             b'[[inbound.auth_users]]\nusername = "app1"\npassword = "plain$s3cret"\n'
             b'[relay]\nallow_networks = ["10.0.0.0/8", "2001:db8::/32"]\n'),
    "server": (b'[server]\nhostname = "mx.example.com"\nworkers = 2\nshutdown_timeout = 5.0\n'
               b'[log]\nlevel = "debug"\nevents = ""\n'),
    "unknown-key": b'[inbound]\nmax_recipient = 5\n',
    "bad-type": b'[inbound]\nmax_recipients = "many"\n',
}


# -- HTTP injection -----------------------------------------------------------------------
# First byte: even = SparkPost's schema, odd = KumoMTA's; then the JSON body.

INJECTION_SEEDS: dict[str, bytes] = {
    "sparkpost": b"\x00" + json.dumps({
        "campaign_id": "spring", "metadata": {"list": "a"},
        "substitution_data": {"code": "X1"},
        "recipients": [{"address": {"email": "ann@example.com", "name": "Ann"},
                        "substitution_data": {"first": "Ann", "items": [{"n": "a"}]}},
                       {"address": "bob@example.com"}],
        "content": {"from": {"email": "news@example.org", "name": "News"},
                    "subject": "Hi {{first}} {{code}}", "reply_to": "r@example.org",
                    "headers": {"X-Tag": "{{first}}"},
                    "text": "{{if first}}Dear {{first}}{{else}}Hello{{end}}",
                    "html": "<p>{{{first}}}</p>{{each items}}{{loop_var.n}}{{end}}",
                    "attachments": [{"name": "a.txt", "type": "text/plain",
                                     "data": "aGVsbG8="}]}}).encode(),
    "sparkpost-rfc822": b"\x02" + json.dumps({
        "return_path": "b@example.org", "recipients": [{"address": "c@example.com"}],
        "content": {"email_rfc822": "From: a@example.org\nSubject: {{x}}\n\nbody\n"}}).encode(),
    "kumo-string": b"\x01" + json.dumps({
        "envelope_sender": "noreply@example.com",
        "content": "Subject: hello {{ name }}\r\n\r\nHello {{ name }}\r\n",
        "recipients": [{"email": "x@example.com", "substitutions": {"name": "X"}}]}).encode(),
    "kumo-builder": b"\x03" + json.dumps({
        "envelope_sender": "noreply@example.com",
        "content": {"from": {"email": "n@example.com", "name": "N"}, "subject": "S {{ a }}",
                    "text_body": "t {{ a }}", "html_body": "<b>{{ a }}</b>",
                    "headers": {"X-Campaign": "c"},
                    "attachments": [{"data": "aGk=", "base64": True,
                                     "content_type": "text/plain", "file_name": "f.txt"}]},
        "substitutions": {"a": "1"},
        "recipients": [{"email": "y@example.com", "name": "Y"}, {"email": "broken"}]}).encode(),
    "not-json": b"\x00{\"recipients\": [",
}


def write_seeds(corpus: Path) -> dict[str, int]:
    """Write every seed as ``corpus/<target>/seed-<name>``; returns counts per target."""
    files: dict[str, dict[str, bytes]] = {
        "server": {n: server_input(s, **kw) for n, (s, kw) in SERVER_SEEDS.items()},  # type: ignore[arg-type]
        "client": {n: client_input(s, **kw) for n, (s, kw) in CLIENT_SEEDS.items()},  # type: ignore[arg-type]
        "address": {n: s.encode("utf-8", "surrogateescape") for n, s in ADDRESS_SEEDS.items()},
        "replies": REPLY_SEEDS,
        "dsn": DSN_SEEDS,
        "config": {**CONFIG_SEEDS,
                   "conf-relay": (ROOT / "conf" / "relay.toml").read_bytes(),
                   **{f"conf-example-{p.stem}": p.read_bytes()
                      for p in sorted((ROOT / "conf" / "examples").glob("*.toml"))}},
        "injection": INJECTION_SEEDS,
    }
    counts = {}
    for target, seeds in files.items():
        d = corpus / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (d / f"seed-{name}").write_bytes(data)
        counts[target] = len(seeds)
    return counts
