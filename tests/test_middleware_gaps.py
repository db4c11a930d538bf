"""Through the real middleware into LocalFiles: XML bodies redacted by element and attribute
name, trusted proxies as CIDR ranges with RFC 7239 `Forwarded`, `Bearer`/`Basic` credentials
in any letter case, and brotli/zstd bodies decoded within the cap."""

from __future__ import annotations

import base64
import json

import brotli
import logsluice
import pytest
import zstandard
from harness.asgi import call, http_records, scope
from logsluice.middleware import LoggingMiddleware


@pytest.fixture
def pipeline(tmp_logs):
    p = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    yield p
    p.close()


def respond_with(status: int, content_type: bytes, body: bytes, headers=()):
    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        start = {"type": "http.response.start", "status": status}
        start["headers"] = [(b"content-type", content_type), *headers]
        await send(start)
        await send({"type": "http.response.body", "body": body})

    return app


# -- XML ------------------------------------------------------------------------------------

SOAP = (
    b'<?xml version="1.0"?><soap:Envelope xmlns:soap="http://www.w3.org/2003/05/soap-envelope">'
    b'<soap:Body><Login user="ada" apiKey="k-123"><Password>hunter2</Password>'
    b"<auth:client_secret><v>s3cr3t</v></auth:client_secret>"
    b'<param name="token" value="tok-7"/><note>fine</note></Login></soap:Body></soap:Envelope>'
)


def test_xml_bodies_are_redacted_by_element_and_attribute_name(pipeline, tmp_logs):
    answer = b"<result><session_id>sess-9</session_id><count>3</count></result>"
    app = respond_with(200, b"text/xml; charset=utf-8", answer)
    mw = LoggingMiddleware(app, pipeline=pipeline)
    call(mw, scope("/soap", "POST", [(b"content-type", b"application/soap+xml")]), [SOAP[:50], SOAP[50:]])
    call(mw, scope("/xml", "POST", [(b"content-type", b"application/xml")]), [SOAP])
    first, second = http_records(pipeline, tmp_logs)
    line = json.dumps([first, second])
    for secret in ("hunter2", "s3cr3t", "k-123", "tok-7", "sess-9"):
        assert secret not in line, secret
    body = first["request_body"]
    assert '<Login user="ada" apiKey="[REDACTED]">' in body
    assert "<Password>[REDACTED]</Password>" in body
    assert "<auth:client_secret>[REDACTED]</auth:client_secret>" in body
    assert '<param name="token" value="[REDACTED]"/>' in body
    assert "<note>fine</note>" in body
    assert first["response_body"] == "<result><session_id>[REDACTED]</session_id><count>3</count></result>"
    assert second["request_body"] == body


def test_truncated_or_broken_xml_is_never_stored_raw(pipeline, tmp_logs):
    app = respond_with(200, b"application/xml", b"<a><b>1</c><secretish>x</secretish>hunter2</a>")
    cut_at = SOAP.index(b"hunter2") + 3
    call(
        LoggingMiddleware(app, pipeline=pipeline, max_body_bytes=cut_at),
        scope("/xml", "POST", [(b"content-type", b"application/xml")]),
        [SOAP],
    )
    (rec,) = http_records(pipeline, tmp_logs)
    assert "hun" not in rec["request_body"]
    assert rec["request_body"].endswith(f"…[truncated, {len(SOAP)} bytes]")
    assert rec["fields"]["request_body_truncated"] is True
    # Mismatched tags: what follows the break is not stored.
    assert rec["response_body"].startswith("<a><b>1")
    assert "hunter2" not in rec["response_body"]
    assert "unreadable XML" in rec["response_body"]


# -- trusted proxies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "headers", "client"),
    [
        # Peer inside a trusted range: the right-most hop that is not a trusted proxy.
        ("10.1.2.3", [(b"x-forwarded-for", b"6.6.6.6, 203.0.113.9, 10.200.0.1")], "203.0.113.9"),
        # Forwarded wins over X-Forwarded-For; quoted IPv6 with a port.
        (
            "fd00::1",
            [
                (b"x-forwarded-for", b"6.6.6.6"),
                (b"forwarded", b'for=6.6.6.6;proto=https, for="[2001:db8:cafe::17]:4711"'),
                (b"forwarded", b'for="[fd00::9]";by=_lb'),
            ],
            "2001:db8:cafe::17",
        ),
        # An obfuscated identifier is never the client: the last trusted hop is reported.
        ("10.0.0.1", [(b"forwarded", b"for=6.6.6.6, for=_hidden, for=10.3.3.3")], "10.3.3.3"),
        # A peer outside every range: its headers are not believed.
        ("192.0.2.77", [(b"x-forwarded-for", b"6.6.6.6"), (b"forwarded", b"for=6.6.6.6")], "192.0.2.77"),
    ],
)
def test_client_behind_trusted_proxy_ranges_and_forwarded(pipeline, tmp_logs, peer, headers, client):
    mw = LoggingMiddleware(
        respond_with(200, b"text/plain", b"ok"),
        pipeline=pipeline,
        trusted_proxies=["10.0.0.0/8", "fd00::/8"],
    )
    call(mw, scope("/ip", headers=headers, client=(peer, 40000)))
    (rec,) = http_records(pipeline, tmp_logs)
    assert rec["client_addr"] == client


# -- credentials in captured text -------------------------------------------------------------


def test_bearer_in_any_case_and_basic_credentials_are_scrubbed(pipeline, tmp_logs):
    basic = base64.b64encode(b"ada:hunter2").decode()
    answer = f"curl -H 'Authorization: BeArEr abcdefgh12345678' -H 'authorization: BASIC {basic}'"
    app = respond_with(200, b"text/plain", answer.encode())
    call(
        LoggingMiddleware(app, pipeline=pipeline),
        scope(
            "/echo",
            "POST",
            [(b"content-type", b"application/json")],
            query=b"note=bEaReR+zyxwvuts98765432&plan=basic+information",
        ),
        [json.dumps({"msg": f"upstream said Basic {basic}", "plan": "basic information"}).encode()],
    )
    (rec,) = http_records(pipeline, tmp_logs)
    line = json.dumps(rec)
    for secret in ("abcdefgh12345678", basic, "zyxwvuts98765432"):
        assert secret not in line, secret
    # Plain text: a sensitive `key: value` hides the rest of its line.
    assert rec["response_body"] == "curl -H 'Authorization: [REDACTED]"
    assert json.loads(rec["request_body"]) == {
        "msg": "upstream said Basic [REDACTED]",
        "plan": "basic information",
    }
    assert rec["query"].endswith("&plan=basic+information")


# -- compressed bodies ------------------------------------------------------------------------


def test_brotli_and_zstd_bodies_are_decoded_within_the_cap(pipeline, tmp_logs):
    doc = json.dumps({"token": "t0k-secret", "n": 1}).encode()
    encoders = {"br": brotli.compress, "zstd": zstandard.ZstdCompressor().compress}
    for name, encode in encoders.items():
        coding = [(b"content-encoding", name.encode())]
        app = respond_with(200, b"application/json", encode(doc), headers=coding)
        call(LoggingMiddleware(app, pipeline=pipeline), scope(f"/{name}"))
    big = b"x" * 5000
    for name, encode in encoders.items():
        coding = [(b"content-encoding", name.encode())]
        app = respond_with(200, b"text/plain", encode(big), headers=coding)
        call(LoggingMiddleware(app, pipeline=pipeline, max_body_bytes=1000), scope(f"/big-{name}"))
    app = respond_with(200, b"application/json", b"\x00not zstd", headers=[(b"content-encoding", b"zstd")])
    call(LoggingMiddleware(app, pipeline=pipeline), scope("/garbage"))
    records = {r["path"]: r for r in http_records(pipeline, tmp_logs)}
    assert "t0k-secret" not in json.dumps(records)
    for name in encoders:
        rec = records[f"/{name}"]
        assert json.loads(rec["response_body"]) == {"token": "[REDACTED]", "n": 1}, name
        assert rec["fields"]["response_body_format"] == "decoded"
        cut = records[f"/big-{name}"]["response_body"]
        assert cut.startswith("x" * 1000) and not cut.startswith("x" * 1001), name
        assert "truncated" in cut
    garbage = records["/garbage"]
    assert garbage["response_body"] == "[zstd body: 9 bytes, not decoded]"
    assert garbage["fields"]["response_body_format"] == "encoded"
