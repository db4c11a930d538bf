"""LoggingMiddleware driven by a synthetic ASGI client (multi-chunk and 1-byte bodies,
disconnects, trailers, extension messages, root_path), records read back from LocalFiles."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import os
import zlib

import logsluice
import pytest
from fastapi import APIRouter, BackgroundTasks, FastAPI, Request
from harness.asgi import Client, call, http_records, read_records, scope
from logsluice import _context
from logsluice.middleware import UNMATCHED_ROUTE, LoggingMiddleware
from loguru import logger
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from support import wait_for


@pytest.fixture
def pipeline(tmp_logs):
    p = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    yield p
    p.close()


def only(pipeline, tmp_logs) -> dict:
    records = http_records(pipeline, tmp_logs)
    assert len(records) == 1, records
    return records[0]


# -- raw ASGI apps -------------------------------------------------------------------------


def echo_app(received: list):
    """Reads the whole body chunk by chunk, answers with it."""

    async def app(scope, receive, send):
        body = b""
        while True:
            m = await receive()
            received.append(m)
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        await send({"type": "http.response.body", "body": body})

    return app


def test_multi_chunk_and_one_byte_bodies_pass_through_and_are_captured(pipeline, tmp_logs):
    received: list = []
    mw = LoggingMiddleware(echo_app(received), pipeline=pipeline)
    text = b"hello, chunked world"
    chunks = [text[i : i + 1] for i in range(len(text))]
    client = call(mw, scope("/echo", "POST", [(b"content-type", b"text/plain")]), chunks)
    assert client.body == text
    # The app saw every chunk message as the server sent it.
    assert [m["body"] for m in received] == chunks
    rec = only(pipeline, tmp_logs)
    assert rec["request_body"] == text.decode()
    assert rec["response_body"] == text.decode()
    assert rec["request_size"] == len(text) == rec["response_size"]
    assert rec["status"] == 200 and rec["level"] == "INFO" and rec["kind"] == "http"


def test_request_headers_and_method_are_recorded_as_they_came_in(pipeline, tmp_logs):
    """An inner middleware that replaces `scope["headers"]` and `scope["method"]` (as
    method-override and header-rewriting middlewares do) does not change the record: it shows
    the request the server received."""
    received: list = []
    inner = echo_app(received)

    async def rewriting(scope, receive, send):
        scope["headers"] = [(b"x-rewritten", b"yes")]
        scope["method"] = "PUT"
        await inner(scope, receive, send)

    mw = LoggingMiddleware(rewriting, pipeline=pipeline)
    headers = [(b"content-type", b"text/plain"), (b"x-original", b"1")]
    client = call(mw, scope("/echo", "POST", headers), [b"body"])
    assert client.body == b"body"
    rec = only(pipeline, tmp_logs)
    assert rec["method"] == "POST"
    assert rec["request_headers"]["x-original"] == "1"
    assert "x-rewritten" not in rec["request_headers"]


def test_headers_in_other_shapes_are_echoed_and_recorded(pipeline, tmp_logs):
    """Headers as a tuple instead of a list, a pair as a list, a pair of `str`: not what
    servers send, but what a hand-written app may; the id is still echoed and the headers
    recorded (as text), and the app's own objects are left as they were."""
    response_headers = ((b"content-type", b"text/plain"), [b"x-list", b"yes"], ("x-str", "text"))

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": response_headers})
        await send({"type": "http.response.body", "body": b"ok"})

    request_headers = [(b"content-type", b"text/plain"), [b"x-list-in", b"1"]]
    client = call(
        LoggingMiddleware(app, pipeline=pipeline), scope("/shapes", "POST", request_headers), [b"x"]
    )
    start = client.sent[0]
    sent = [tuple(h) for h in start["headers"]]
    assert sent[:3] == [tuple(h) for h in response_headers]
    assert sent[3][0] == b"x-request-id" and len(sent) == 4
    assert len(response_headers) == 3
    rec = only(pipeline, tmp_logs)
    assert rec["response_headers"]["x-list"] == "yes"
    assert rec["response_headers"]["x-str"] == "text"
    assert rec["response_headers"]["x-request-id"] == sent[3][1].decode() == rec["request_id"]
    assert rec["request_headers"]["x-list-in"] == "1"


def test_messages_with_keys_built_at_run_time_are_read_alike(pipeline, tmp_logs):
    """Message keys that are not the interned literals servers write (built at run time, or
    beside a key that is not a str) are read the same: by value."""

    def key(name: str) -> str:
        # A new str object with the same text: not the interned one.
        return "".join(list(name))

    async def app(scope, receive, send):
        m = await receive()
        assert m["body"] == b"in"
        await send({key("type"): "http.response.start", key("status"): 201, key("headers"): []})
        await send({key("type"): "http.response.body", key("body"): b"out", 7: "not a str key"})

    class RuntimeKeys(Client):
        async def receive(self) -> dict:
            m = await super().receive()
            return {key(k): v for k, v in m.items()}

    client = RuntimeKeys([b"in"])
    mw = LoggingMiddleware(app, pipeline=pipeline)
    asyncio.run(mw(scope("/keys", "POST"), client.receive, client.send))
    assert client.status == 201 and client.body == b"out"
    rec = only(pipeline, tmp_logs)
    assert rec["status"] == 201
    assert rec["request_body"] == "in" and rec["response_body"] == "out"
    assert rec["request_size"] == 2 and rec["response_size"] == 3
    assert rec["response_headers"]["x-request-id"] == rec["request_id"]


def test_a_header_list_holding_other_shapes_is_copied_with_the_echo(pipeline, tmp_logs):
    """A response header list with a pair as a list and a pair of `str` among the tuples:
    the id is echoed on a copy, after every header, and the app's list is left alone; a
    list whose odd-shaped pair already names the header gets no second one."""
    mine = [(b"content-type", b"text/plain"), [b"x-list", b"yes"], ("x-str", "text")]
    theirs = [(b"content-type", b"text/plain"), [b"x-request-id", b"theirs"]]

    def app(headers):
        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"ok"})

        return app

    client = call(LoggingMiddleware(app(mine), pipeline=pipeline), scope("/list"))
    sent = client.sent[0]["headers"]
    assert sent[:3] == mine and len(mine) == 3 and sent is not mine
    assert sent[3][0] == b"x-request-id" and len(sent) == 4
    client = call(LoggingMiddleware(app(theirs), pipeline=pipeline), scope("/list"))
    assert client.sent[0]["headers"] == theirs
    records = http_records(pipeline, tmp_logs)
    assert [r["response_headers"]["x-request-id"] for r in records] == [sent[3][1].decode(), "theirs"]
    assert records[0]["response_headers"]["x-str"] == "text"


def test_text_beyond_ascii_and_lone_surrogates_are_recorded(pipeline, tmp_logs):
    """Paths, root paths and methods that are not ASCII (read another way than the ASCII
    strs servers usually give) are recorded as text; a lone surrogate becomes U+FFFD."""
    for path, root, method in (("/café/ü", "", "GET"), ("/x\udcff", "", "GET"), ("/p", "/rööt", "PÖST")):
        s = scope("/", method, root_path=root)
        s["path"] = path
        call(LoggingMiddleware(echo_app([]), pipeline=pipeline), s)
    records = http_records(pipeline, tmp_logs)
    assert [r["path"] for r in records] == ["/café/ü", "/x\ufffd", "/rööt/p"]
    assert [r["method"] for r in records] == ["GET", "GET", "PÖST"]


def test_capture_stops_at_the_cap_with_marker_and_full_size(pipeline, tmp_logs):
    received: list = []
    mw = LoggingMiddleware(echo_app(received), pipeline=pipeline, max_body_bytes=100)
    chunks = [b"a" * 70, b"b" * 70, b"c" * 70]
    client = call(mw, scope("/echo", "POST", [(b"content-type", b"text/plain")]), chunks)
    assert client.body == b"".join(chunks)
    rec = only(pipeline, tmp_logs)
    assert rec["request_body"].startswith("a" * 70 + "b" * 30)
    assert rec["request_body"].endswith("…[truncated, 210 bytes]")
    assert rec["request_size"] == 210
    assert rec["fields"]["request_body_truncated"] is True
    assert rec["fields"]["response_body_truncated"] is True


def test_request_body_time_limit_stops_capture_but_not_the_body(pipeline, tmp_logs):
    received: list = []
    mw = LoggingMiddleware(echo_app(received), pipeline=pipeline, request_body_timeout=1e-9)
    client = call(mw, scope("/echo", "POST", [(b"content-type", b"text/plain")]), [b"first", b"second"])
    assert client.body == b"firstsecond"
    rec = only(pipeline, tmp_logs)
    assert rec["request_body"].startswith("first")
    assert "second" not in rec["request_body"]
    assert rec["fields"]["request_body_timed_out"] is True
    assert rec["request_size"] == 11


def test_middleware_never_calls_receive_itself(pipeline, tmp_logs):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    client = Client([b"body the app never reads"])
    asyncio.run(LoggingMiddleware(app, pipeline=pipeline)(scope("/x", "POST"), client.receive, client.send))
    assert client.receive_calls == 0
    rec = only(pipeline, tmp_logs)
    assert rec["status"] == 204 and rec["request_body"] is None and rec["response_body"] is None


def test_every_message_reaches_the_server_unmodified_and_in_order(pipeline, tmp_logs):
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"x-dup", b"1"), (b"x-dup", b"2")],
        "trailers": True,
    }
    messages = [
        start,
        {"type": "http.response.body", "body": b"part1", "more_body": True},
        {"type": "http.response.debug", "info": {"anything": 1}},
        {"type": "http.response.body", "body": b"part2", "more_body": False},
        {"type": "http.response.trailers", "headers": [(b"x-checksum", b"abc")], "more_trailers": False},
    ]
    frozen = json.dumps([{k: repr(v) for k, v in m.items()} for m in messages])

    async def app(scope, receive, send):
        for m in messages:
            await send(m)

    client = call(LoggingMiddleware(app, pipeline=pipeline), scope("/t"))
    # Same objects, same order; the start message is a copy with the request id added.
    assert client.sent[1:] == messages[1:]
    assert all(a is b for a, b in zip(client.sent[1:], messages[1:], strict=False))
    sent_start = client.sent[0]
    assert sent_start["headers"][:4] == start["headers"]
    assert sent_start["headers"][4][0] == b"x-request-id"
    assert sent_start["trailers"] is True
    # What the app passed was never mutated.
    assert json.dumps([{k: repr(v) for k, v in m.items()} for m in messages]) == frozen
    rec = only(pipeline, tmp_logs)
    # Finished with the trailers, not the last body message.
    assert rec["response_size"] == 10 and rec["error"] is False
    assert rec["response_headers"]["set-cookie"] == "[REDACTED], [REDACTED]"
    assert rec["response_headers"]["x-dup"] == "1, 2"


def test_a_file_sent_by_path_is_finished_with_its_size(pipeline, tmp_logs, tmp_path):
    # What FileResponse sends when the server offers the pathsend extension.
    report = tmp_path / "report.bin"
    report.write_bytes(b"x" * 5000)

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5000")]})
        await send({"type": "http.response.pathsend", "path": str(report)})

    client = call(LoggingMiddleware(app, pipeline=pipeline), scope("/report"))
    assert client.sent[1] == {"type": "http.response.pathsend", "path": str(report)}
    rec = only(pipeline, tmp_logs)
    assert rec["status"] == 200 and rec["response_size"] == 5000 and rec["error"] is False


def test_existing_request_id_header_is_not_duplicated(pipeline, tmp_logs):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"X-Request-ID", b"mine")]})
        await send({"type": "http.response.body", "body": b"ok"})

    client = call(LoggingMiddleware(app, pipeline=pipeline), scope("/t"))
    assert client.sent[0]["headers"] == [(b"X-Request-ID", b"mine")]


def test_head_204_and_304_store_no_response_body(pipeline, tmp_logs):
    async def app(scope, receive, send):
        status = int(scope["path"].strip("/"))
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"" if status != 200 else b"body"})

    mw = LoggingMiddleware(app, pipeline=pipeline)
    call(mw, scope("/200", "HEAD"))
    call(mw, scope("/204"))
    call(mw, scope("/304"))
    records = http_records(pipeline, tmp_logs)
    assert [r["status"] for r in records] == [200, 204, 304]
    assert all(r["response_body"] is None for r in records)


@pytest.mark.parametrize(
    ("root_path", "path", "expected"),
    [("/api", "/api/items", "/api/items"), ("/api", "/items", "/api/items"), ("", "/items", "/items")],
)
def test_path_respects_root_path_without_doubling(pipeline, tmp_logs, root_path, path, expected):
    call(LoggingMiddleware(echo_app([]), pipeline=pipeline), scope(path, root_path=root_path))
    assert only(pipeline, tmp_logs)["path"] == expected


def test_exception_before_response_is_a_500_record_and_the_same_exception(pipeline, tmp_logs):
    boom = RuntimeError("boom")

    async def app(scope, receive, send):
        raise boom

    with pytest.raises(RuntimeError) as info:
        call(LoggingMiddleware(app, pipeline=pipeline), scope("/boom"))
    assert info.value is boom
    rec = only(pipeline, tmp_logs)
    assert rec["status"] == 500 and rec["level"] == "ERROR" and rec["error"] is True
    assert "RuntimeError: boom" in rec["exception"]


def test_exception_after_response_start_keeps_real_status_with_error_flag(pipeline, tmp_logs):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise ValueError("mid-stream")

    with pytest.raises(ValueError):
        call(LoggingMiddleware(app, pipeline=pipeline), scope("/s"))
    rec = only(pipeline, tmp_logs)
    assert rec["status"] == 200 and rec["error"] is True and rec["level"] == "ERROR"
    assert "ValueError: mid-stream" in rec["exception"]


def test_client_disconnect_is_a_499_record(pipeline, tmp_logs):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"tick", "more_body": True})
        message = await receive()
        assert message["type"] == "http.disconnect"

    call(LoggingMiddleware(app, pipeline=pipeline), scope("/stream"), [], disconnect=True)
    rec = only(pipeline, tmp_logs)
    assert rec["status"] == 499 and rec["fields"]["disconnected"] is True and rec["level"] == "WARNING"


def test_a_stream_closed_after_the_client_left_is_still_a_499(pipeline, tmp_logs):
    # What Starlette's BaseHTTPMiddleware does to a stream whose client left: it sends the
    # closing empty body after the disconnect. The client never got the response.
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: first\n\n", "more_body": True})
        assert (await receive())["type"] == "http.request"
        assert (await receive())["type"] == "http.disconnect"
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    call(LoggingMiddleware(app, pipeline=pipeline), scope("/events"), [b""], disconnect=True)
    rec = only(pipeline, tmp_logs)
    assert rec["status"] == 499 and rec["level"] == "WARNING" and rec["fields"]["disconnected"] is True


def test_send_failing_because_the_client_left_is_a_499_not_an_error(pipeline, tmp_logs):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})

    async def gone(message):
        if message["type"] == "http.response.body":
            raise ConnectionResetError("client went away")

    async def receive():
        return {"type": "http.request", "body": b""}

    with pytest.raises(ConnectionResetError):
        asyncio.run(LoggingMiddleware(app, pipeline=pipeline)(scope("/s"), receive, gone))
    rec = only(pipeline, tmp_logs)
    assert rec["status"] == 499 and rec["level"] == "WARNING" and rec["exception"] is None


def test_a_client_leaving_mid_upload_is_a_499_not_an_app_error(pipeline, tmp_logs):
    async def upload(request: Request) -> Response:
        await request.body()  # raises ClientDisconnect: the client left mid-upload
        return Response("stored")

    messages = [
        {"type": "http.request", "body": b"first half", "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive():
        return messages.pop(0)

    async def send(message):
        pass  # what servers do with messages for a client that left (Starlette sends its 500)

    # Where add_middleware puts it: inside Starlette's error middleware, which sends the 500.
    app = Starlette(
        routes=[Route("/upload", upload, methods=["POST"])],
        middleware=[Middleware(LoggingMiddleware, pipeline=pipeline)],
    )
    with pytest.raises(ClientDisconnect):
        asyncio.run(app(scope("/upload", "POST"), receive, send))
    rec = only(pipeline, tmp_logs)
    assert rec["status"] == 499 and rec["level"] == "WARNING" and rec["exception"] is None
    assert rec["fields"]["disconnected"] is True


def test_app_returning_without_response_is_a_500_record(pipeline, tmp_logs):
    async def app(scope, receive, send):
        return None

    call(LoggingMiddleware(app, pipeline=pipeline), scope("/nothing"))
    rec = only(pipeline, tmp_logs)
    assert rec["status"] == 500 and rec["fields"]["no_response"] is True and rec["level"] == "ERROR"


def test_lifespan_and_websocket_pass_straight_through(pipeline, tmp_logs):
    seen = []

    async def app(scope, receive, send):
        seen.append((scope["type"], receive, send))

    mw = LoggingMiddleware(app, pipeline=pipeline)

    async def receive():
        return {}

    async def send(m):
        pass

    for kind in ("lifespan", "websocket", "something-new"):
        asyncio.run(mw({"type": kind}, receive, send))
    assert seen == [(k, receive, send) for k in ("lifespan", "websocket", "something-new")]
    assert http_records(pipeline, tmp_logs) == []
    assert mw.stats()["seen"] == 0


def test_streaming_with_concurrent_receive_is_not_buffered(pipeline, tmp_logs):
    """The app listens for disconnect while streaming (as Starlette does); each chunk
    reaches the server before the app produces the next one."""
    order = []

    async def app(scope, receive, send):
        async def listen():
            while (await receive())["type"] != "http.disconnect":
                pass

        task = asyncio.ensure_future(listen())
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for i in range(3):
            order.append(f"produce {i}")
            await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        task.cancel()

    client = Client([b""])
    original_send = client.send

    async def send(m):
        if m["type"] == "http.response.body" and m.get("body"):
            order.append(f"server got {m['body'].decode().strip()}")
        await original_send(m)

    asyncio.run(LoggingMiddleware(app, pipeline=pipeline)(scope("/sse"), client.receive, send))
    assert order == [x for i in range(3) for x in (f"produce {i}", f"server got data: {i}")]
    rec = only(pipeline, tmp_logs)
    assert rec["response_body"] == "data: 0\n\ndata: 1\n\ndata: 2\n\n" and rec["status"] == 200


# -- FastAPI / Starlette: routes, correlation, completion -----------------------------------


def make_fastapi(pipeline, **options):
    app = FastAPI()
    router = APIRouter(prefix="/users")
    inner = APIRouter(prefix="/{user_id}")

    @inner.get("/orders/{order_id}")
    async def order(user_id: int, order_id: int):
        return {"user": user_id, "order": order_id}

    @inner.get("/files/{name:path}")
    async def user_file(user_id: int, name: str):
        return {"user": user_id, "file": name}

    router.include_router(inner)
    app.include_router(router)

    @app.get("/items/{item_id}")
    async def item(item_id: int):
        return {"id": item_id}

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/fail")
    async def fail():
        raise RuntimeError("failed")

    sub = FastAPI()

    @sub.get("/things/{thing}")
    async def thing(thing: str):
        return {"thing": thing}

    app.mount("/v1", sub)
    app.mount("/tenants/{tenant}", sub)
    app.add_middleware(LoggingMiddleware, pipeline=pipeline, **options)
    return app


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/items/3", "/items/{item_id}"),
        ("/users/1/orders/2", "/users/{user_id}/orders/{order_id}"),
        # Converters kept, as for routes outside included routers.
        ("/users/1/files/a/b.txt", "/users/{user_id}/files/{name:path}"),
        ("/v1/things/x", "/v1/things/{thing}"),
        ("/tenants/acme/things/x", "/tenants/{tenant}/things/{thing}"),
        ("/nope", UNMATCHED_ROUTE),
    ],
)
def test_route_templates_for_fastapi_nested_routers_and_mounts(pipeline, tmp_logs, path, route):
    call(make_fastapi(pipeline), scope(path))
    rec = only(pipeline, tmp_logs)
    assert rec["route"] == route
    assert rec["path"] == path


def test_route_templates_for_starlette(pipeline, tmp_logs):
    async def hello(request):
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/hello/{name}", hello), Mount("/m", routes=[Route("/x/{y}", hello)])])
    mw = LoggingMiddleware(app, pipeline=pipeline)
    call(mw, scope("/hello/bob"))
    call(mw, scope("/m/x/1"))
    assert [r["route"] for r in http_records(pipeline, tmp_logs)] == ["/hello/{name}", "/m/x/{y}"]


def test_route_lookup_can_never_raise(pipeline, tmp_logs):
    class Evil:
        @property
        def path(self):
            raise RuntimeError("no")

    async def app(scope, receive, send):
        scope["route"] = Evil()
        scope["root_path"] = "/changed"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"fine"})

    mw = LoggingMiddleware(app, pipeline=pipeline)
    client = call(mw, scope("/x"))
    assert client.status == 200 and client.body == b"fine"
    assert only(pipeline, tmp_logs)["route"] == UNMATCHED_ROUTE
    assert mw.stats()["internal_errors"] >= 1


def test_fastapi_exception_gives_500_record(pipeline, tmp_logs):
    with pytest.raises(RuntimeError, match="failed"):
        call(make_fastapi(pipeline), scope("/fail"))
    rec = only(pipeline, tmp_logs)
    assert rec["status"] == 500 and rec["route"] == "/fail" and "RuntimeError: failed" in rec["exception"]


def test_request_id_joins_app_logs_and_background_tasks(pipeline, tmp_logs):
    app = FastAPI()
    handler_id = pipeline.attach(logger, level="INFO")
    std = logging.getLogger("test.app")
    std.setLevel(logging.INFO)
    handler = pipeline.logging_handler()
    std.addHandler(handler)
    seen = {}

    def background():
        seen["kept_before_background"] = mw_ref[0].stats()["kept"]
        seen["rid_in_background"] = _context.request_id.get()
        logger.info("in background")

    @app.get("/work")
    async def work(tasks: BackgroundTasks):
        seen["rid"] = _context.request_id.get()
        logger.info("loguru in handler")
        std.info("stdlib in handler")
        tasks.add_task(background)
        return {"ok": True}

    app.add_middleware(LoggingMiddleware, pipeline=pipeline)
    app.build_middleware_stack()
    stack = app.middleware_stack = app.build_middleware_stack()
    while not isinstance(stack, LoggingMiddleware):
        stack = stack.app
    mw_ref = [stack]
    try:
        client = call(app, scope("/work", headers=[(b"x-request-id", b"req-42")]))
    finally:
        logger.remove(handler_id)
        std.removeHandler(handler)
    assert client.header(b"x-request-id") == b"req-42"
    assert seen["rid"] == seen["rid_in_background"] == "req-42"
    # The record was handed off when the response finished, before the background task.
    assert seen["kept_before_background"] == 1
    assert _context.request_id.get() is None
    pipeline.flush()
    records = read_records(tmp_logs)
    by_message = {r["message"]: r for r in records}
    for message in ("loguru in handler", "stdlib in handler", "in background"):
        assert by_message[message]["request_id"] == "req-42"
    (access,) = [r for r in records if r["kind"] == "http"]
    assert access["request_id"] == "req-42"


def test_an_exception_after_the_response_is_an_error_record_of_the_request(pipeline, tmp_logs):
    app = FastAPI()

    def background():
        raise ValueError("boom in background")

    @app.get("/work/{n}")
    async def work(n: int, tasks: BackgroundTasks):
        tasks.add_task(background)
        return {"ok": n}

    app.add_middleware(LoggingMiddleware, pipeline=pipeline)
    client = Client([b""])
    request = scope("/work/7", headers=[(b"x-request-id", b"req-late")])
    with pytest.raises(ValueError, match="boom in background"):
        asyncio.run(app(request, client.receive, client.send))
    assert client.status == 200 and client.body == b'{"ok":7}'
    pipeline.flush()
    records = read_records(tmp_logs)
    (access,) = [r for r in records if r["kind"] == "http"]
    assert access["status"] == 200 and access["exception"] is None and access["request_id"] == "req-late"
    (late,) = [r for r in records if r["kind"] == "app"]
    assert late["level"] == "ERROR" and late["logger"] == "logsluice.middleware"
    assert late["request_id"] == "req-late"
    assert late["message"].startswith("ValueError raised after the response to GET /work/7 was sent")
    assert "Traceback" in late["exception"] and "ValueError: boom in background" in late["exception"]
    assert late["fields"] == {"method": "GET", "path": "/work/7"}


def test_an_exception_before_the_response_ends_is_only_in_the_access_record(pipeline, tmp_logs):
    with pytest.raises(RuntimeError, match="failed"):
        call(make_fastapi(pipeline), scope("/fail"))
    pipeline.flush()
    records = read_records(tmp_logs)
    assert [r["kind"] for r in records] == ["http"]
    assert "RuntimeError: failed" in records[0]["exception"]


@pytest.mark.parametrize("inbound", [b"has space", b"x" * 200, b"<script>", "é".encode()])
def test_unsafe_inbound_request_ids_are_replaced(pipeline, tmp_logs, inbound):
    client = call(
        LoggingMiddleware(echo_app([]), pipeline=pipeline), scope("/", headers=[(b"x-request-id", inbound)])
    )
    rid = client.header(b"x-request-id")
    assert rid != inbound and len(rid) == 36
    assert only(pipeline, tmp_logs)["request_id"] == rid.decode()


def test_tokens_in_paths_are_scrubbed(pipeline, tmp_logs):
    call(LoggingMiddleware(echo_app([]), pipeline=pipeline), scope(f"/reset/{JWT}"))
    rec = only(pipeline, tmp_logs)
    assert rec["path"] == "/reset/[REDACTED:jwt]" and JWT not in rec["message"]


def test_control_characters_in_path_and_query_are_stored_escaped(pipeline, tmp_logs):
    """A NUL in the path (a server decodes `%00` into it) is stored escaped, never dropped;
    in the query, an encoded `%00`, a raw NUL and an encoded `\\u0000` stay three things."""
    request = scope(
        "/files/a\x00b\x1bc", "GE\x00T", query=b"x=%00&y=\x00&z=%5Cu0000&n=4111+1111+1111+1111\x00"
    )
    request["raw_path"] = b"/files/a%00b%1Bc"
    call(LoggingMiddleware(echo_app([]), pipeline=pipeline), request)
    rec = only(pipeline, tmp_logs)
    assert rec["path"] == "/files/a\\u0000b\\u001bc"
    assert rec["method"] == "GE\\u0000T"
    assert rec["message"].startswith("GE\\u0000T /files/a\\u0000b\\u001bc 200 ")
    assert rec["query"] == "x=%00&y=\\u0000&z=%5Cu0000&n=[REDACTED:card]%5Cu0000"


def test_a_late_exception_keeps_control_characters_of_the_path_escaped(pipeline, tmp_logs):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        raise ValueError("after the response")

    with pytest.raises(ValueError, match="after the response"):
        call(LoggingMiddleware(app, pipeline=pipeline), scope("/a\x00b"))
    pipeline.flush()
    (late,) = [r for r in read_records(tmp_logs) if r["kind"] == "app"]
    assert late["fields"] == {"method": "GET", "path": "/a\\u0000b"}
    assert late["message"].startswith("ValueError raised after the response to GET /a\\u0000b was sent")


def test_traceparent_is_parsed(pipeline, tmp_logs):
    tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    call(LoggingMiddleware(echo_app([]), pipeline=pipeline), scope("/", headers=[(b"traceparent", tp)]))
    rec = only(pipeline, tmp_logs)
    assert rec["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and rec["span_id"] == "00f067aa0ba902b7"


def test_internal_failure_of_the_hand_off_never_reaches_the_app(pipeline, tmp_logs):
    mw = LoggingMiddleware(echo_app([]), pipeline=pipeline)
    real = mw._sink

    class Broken:
        """The real sink, except that no request can begin."""

        def begin(self, *args):
            raise RuntimeError("core gone")

        def __getattr__(self, name):
            return getattr(real, name)

    mw._sink = Broken()
    client = call(mw, scope("/", "POST"), [b"abc"])
    assert client.status == 200 and client.body == b"abc"
    assert mw.stats()["internal_errors"] == 1
    assert mw.last_internal_error == "RuntimeError"
    assert http_records(pipeline, tmp_logs) == []


def test_a_full_hand_off_drops_requests_counts_them_and_every_response_still_goes_out(tmp_logs):
    # Room for 5 finished requests between two looks of the redaction thread (every 20 ms,
    # or at 256 waiting): a burst of 2,000 requests in one event loop overflows it.
    p = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs), handoff_max_requests=5)
    mw = LoggingMiddleware(echo_app([]), pipeline=p)
    n = 2000

    async def burst() -> list[int]:
        statuses = []
        for i in range(n):
            client = Client([b"x"])
            await mw(scope(f"/{i}", "POST"), client.receive, client.send)
            statuses.append(client.status)
        return statuses

    assert asyncio.run(burst()) == [200] * n
    records = http_records(p, tmp_logs)
    http = p.stats()["http"]
    p.close()
    assert http["seen"] == http["kept"] == n
    assert 0 < http["handoff_dropped"] < n
    assert http["handoff_waiting"] == 0
    # Every request is either stored or counted as dropped: none is lost silently.
    assert len(records) + http["handoff_dropped"] == n
    assert len({r["path"] for r in records}) == len(records)


def test_bodies_held_by_the_hand_off_count_against_its_byte_bound_and_arrive_intact(tmp_logs):
    # Bodies that came in one message are handed to the redaction thread by reference, not
    # copied: they must still count against handoff_max_bytes (1 MiB holds about eight of
    # these exchanges, 2 x 60 KB each), and each stored record must hold its own body.
    p = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs), handoff_max_bytes=1 << 20)
    mw = LoggingMiddleware(echo_app([]), pipeline=p)
    n = 300

    def body(i: int) -> bytes:
        return f"item {i}: {'abc' * 20_000}".encode()

    async def burst() -> list[bytes]:
        answers = []
        for i in range(n):
            client = Client([body(i)])
            await mw(scope(f"/{i}", "POST"), client.receive, client.send)
            answers.append(client.body)
        return answers

    assert asyncio.run(burst()) == [body(i) for i in range(n)]
    records = http_records(p, tmp_logs)
    http = p.stats()["http"]
    p.close()
    assert 0 < http["handoff_dropped"] < n
    assert len(records) + http["handoff_dropped"] == n
    for r in records:
        i = int(r["path"][1:])
        assert r["request_body"] == r["response_body"] == body(i).decode(), r["path"]
        assert r["request_size"] == r["response_size"] == len(body(i))


def test_internal_failure_while_sampling_keeps_the_request(pipeline, tmp_logs):
    mw = LoggingMiddleware(echo_app([]), pipeline=pipeline, sample={"/other": 0.0})

    def broken(*args):
        raise LookupError("rules gone")

    mw._decide = broken
    client = call(mw, scope("/", "POST"), [b"abc"])
    assert client.status == 200 and client.body == b"abc"
    assert mw.stats()["internal_errors"] == 1 and mw.stats()["kept"] == 1
    assert mw.last_internal_error == "LookupError"
    assert only(pipeline, tmp_logs)["request_body"] == "abc"


# -- sampling, tail rules, rate limits ---------------------------------------------------------


def test_sampling_exclusions_tail_rules_and_stats(pipeline, tmp_logs):
    app = make_fastapi(pipeline, sample={"/health": 0.0, "/items/*": 0.5}, exclude=["/v1/*"])
    call(app, scope("/health"))  # sampled out
    call(app, scope("/v1/things/x"))  # excluded
    with pytest.raises(RuntimeError):
        call(app, scope("/fail"))  # kept: default rate
    ids = [f"id-{i}" for i in range(40)]
    expected = [i for i in ids if zlib.crc32(i.encode()) / 2**32 < 0.5]
    for rid in ids:
        call(app, scope(f"/items/{rid[3:]}", headers=[(b"x-request-id", rid.encode())]))
    records = http_records(pipeline, tmp_logs)
    items = [r for r in records if r["route"] == "/items/{item_id}"]
    assert [r["request_id"] for r in items] == expected  # deterministic by request id
    assert all(r["sample_rate"] == 0.5 for r in items)
    assert not [r for r in records if r["route"] in ("/health", "/v1/things/{thing}")]
    stats = pipeline.stats()["http"]
    assert stats["seen"] == 43
    assert stats["excluded"] == 1
    assert stats["kept"] == 1 + len(expected)
    assert stats["sampled_out"] == 1 + 40 - len(expected)
    assert stats["seen"] == stats["kept"] + stats["sampled_out"] + stats["excluded"] + stats["rate_limited"]
    assert stats["handoff_waiting"] == 0 and stats["handoff_dropped"] == 0


def test_rules_on_concrete_paths_apply_to_those_paths_only(pipeline, tmp_logs):
    # The rules match paths of a route whose template they do not name; whichever path
    # came first must not decide for the route's other paths.
    app = make_fastapi(pipeline, sample={"/items/42": 0.0}, exclude=["/items/7*"])
    for path in ("/items/42", "/items/1", "/items/70", "/items/2", "/items/42"):
        call(app, scope(path))
    assert sorted(r["path"] for r in http_records(pipeline, tmp_logs)) == ["/items/1", "/items/2"]
    stats = pipeline.stats()["http"]
    assert (stats["sampled_out"], stats["excluded"], stats["kept"]) == (2, 1, 2)


def test_tail_rules_keep_errors_of_sampled_out_routes_without_bodies(pipeline, tmp_logs):
    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b"down"})

    mw = LoggingMiddleware(app, pipeline=pipeline, sample={"/*": 0.0})
    call(mw, scope("/x", "POST"), [b"payload"])
    rec = only(pipeline, tmp_logs)
    assert rec["status"] == 503 and rec["sample_rate"] == 1.0
    assert rec["request_body"] is None and rec["response_body"] is None
    assert rec["fields"]["bodies"] == "not captured: sampled out"
    assert rec["request_size"] == 7


def test_slow_requests_are_always_kept(pipeline, tmp_logs):
    mw = LoggingMiddleware(echo_app([]), pipeline=pipeline, default_sample_rate=0.0, slow_request_ms=1e-6)
    call(mw, scope("/slow"))
    assert only(pipeline, tmp_logs)["sample_rate"] == 1.0


def test_rate_limits_cap_floods_with_a_separate_error_bucket(pipeline, tmp_logs):
    async def app(scope, receive, send):
        status = 500 if scope["path"] == "/err" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = LoggingMiddleware(app, pipeline=pipeline, rate_limit=1e-6, error_rate_limit=1e-6)
    for path in ("/a", "/a", "/a", "/err", "/err"):
        call(mw, scope(path))
    stats = mw.stats()
    assert stats["kept"] == 2 and stats["rate_limited"] == 3
    assert sorted(r["path"] for r in http_records(pipeline, tmp_logs)) == ["/a", "/err"]


def test_per_route_rate_limit(pipeline, tmp_logs):
    app = make_fastapi(pipeline, route_rate_limit=1e-6)
    for path in ("/items/1", "/items/2", "/health"):
        call(app, scope(path))
    assert pipeline.stats()["http"]["rate_limited"] == 1
    assert [r["path"] for r in http_records(pipeline, tmp_logs)] == ["/items/1", "/health"]


def test_a_route_over_its_own_limit_leaves_the_global_budget_to_the_others(pipeline, tmp_logs):
    app = make_fastapi(pipeline, rate_limit=3, route_rate_limit=1e-6)
    for path in ["/items/1"] * 20 + ["/health", "/fail"]:
        try:
            call(app, scope(path))
        except RuntimeError:
            pass  # /fail raises: an error, from the separate (unlimited) error bucket
    assert [r["path"] for r in http_records(pipeline, tmp_logs)] == ["/items/1", "/health", "/fail"]
    assert pipeline.stats()["http"]["rate_limited"] == 19


# -- redaction and content policy ---------------------------------------------------------

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"


def respond_with(status: int, content_type: bytes, body: bytes, headers=()):
    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type), *headers],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def test_default_redaction_of_headers_query_and_bodies(pipeline, tmp_logs):
    secrets = [
        "hunter2",
        "s3cr3t",
        "abcdefgh12345678",
        "ck=1",
        "k-123",
        "sess-9",
        "4111 1111 1111 1111",
        JWT,
        "tok-7",
    ]
    app = respond_with(
        200,
        b"application/json",
        json.dumps({"access_token": "tok-7", "card": "4111 1111 1111 1111", "note": f"jwt {JWT}"}).encode(),
        headers=[(b"set-cookie", b"sess-9")],
    )
    body = json.dumps(
        {"user": "ada", "Password": "hunter2", "deep": [{"client_secret": {"v": "s3cr3t"}}]}
    ).encode()
    call(
        LoggingMiddleware(app, pipeline=pipeline),
        scope(
            "/login",
            "POST",
            headers=[
                (b"content-type", b"application/json"),
                (b"authorization", b"Bearer abcdefgh12345678"),
                (b"Cookie", b"ck=1"),
                (b"X-Api-Key", b"k-123"),
                (b"x_api_key", b"k-123"),
            ],
            query=b"api_key=k-123&page=2",
        ),
        [body[:10], body[10:]],
    )
    rec = only(pipeline, tmp_logs)
    line = json.dumps(rec)
    for secret in secrets:
        assert secret not in line, secret
    assert rec["query"] == "api_key=[REDACTED]&page=2"
    for name in ("authorization", "cookie", "x-api-key", "x_api_key"):
        assert rec["request_headers"][name] == "[REDACTED]"
    assert rec["response_headers"]["set-cookie"] == "[REDACTED]"
    assert json.loads(rec["request_body"])["user"] == "ada"
    assert json.loads(rec["request_body"])["deep"][0]["client_secret"] == "[REDACTED]"
    assert json.loads(rec["response_body"])["card"] == "[REDACTED:card]"


def test_truncated_json_form_and_text_are_scrubbed(pipeline, tmp_logs):
    mw = LoggingMiddleware(
        respond_with(200, b"text/plain", b"Bearer zzzzzzzzzzzz ok\x1b[0m"), pipeline=pipeline
    )
    big = json.dumps({"a": "x" * 50, "password": "hunter2" * 20}).encode()
    call(
        mw.__class__(mw.app, pipeline=pipeline, max_body_bytes=70),
        scope("/j", "POST", [(b"content-type", b"application/json")]),
        [big],
    )
    call(
        mw,
        scope("/f", "POST", [(b"content-type", b"application/x-www-form-urlencoded")]),
        [b"user=ada&passwd=hunter2"],
    )
    records = http_records(pipeline, tmp_logs)
    assert "hunter2" not in json.dumps(records)
    assert records[0]["request_body"].endswith(f"…[truncated, {len(big)} bytes]")
    assert records[1]["request_body"] == "user=ada&passwd=[REDACTED]"
    assert records[1]["response_body"] == "Bearer [REDACTED] ok\\u001b[0m"


def test_bodies_of_401_and_403_are_not_captured_by_default(pipeline, tmp_logs):
    app = respond_with(401, b"application/json", b'{"detail": "bad password hunter2"}')
    call(
        LoggingMiddleware(app, pipeline=pipeline),
        scope("/login", "POST", [(b"content-type", b"text/plain")]),
        [b"pw hunter2"],
    )
    call(
        LoggingMiddleware(app, pipeline=pipeline, capture_auth_failure_bodies=True),
        scope("/login", "POST", [(b"content-type", b"text/plain")]),
        [b"pw"],
    )
    first, second = http_records(pipeline, tmp_logs)
    assert first["request_body"] is None and first["response_body"] is None and first["level"] == "WARNING"
    assert second["request_body"] == "pw"
    assert second["response_body"] == '{"detail": "bad password hunter2"}'


def test_redaction_lists_extend_or_replace(pipeline, tmp_logs):
    app = respond_with(200, b"application/json", b'{"ssn_like": "1", "password": "p"}')
    headers = [(b"content-type", b"application/json"), (b"x-internal", b"v"), (b"authorization", b"a")]
    call(
        LoggingMiddleware(
            app, pipeline=pipeline, redact_headers=["x-internal"], redact_body_keys=["ssn_like"]
        ),
        scope("/", headers=headers),
    )
    call(
        LoggingMiddleware(app, pipeline=pipeline, redact_defaults=False, redact_headers=["x-internal"]),
        scope("/", headers=headers),
    )
    extended, replaced = http_records(pipeline, tmp_logs)
    assert extended["request_headers"]["x-internal"] == "[REDACTED]"
    assert extended["request_headers"]["authorization"] == "[REDACTED]"
    assert json.loads(extended["response_body"]) == {"ssn_like": "[REDACTED]", "password": "[REDACTED]"}
    assert replaced["request_headers"]["authorization"] == "a"
    assert json.loads(replaced["response_body"])["password"] == "p"


def test_content_policy_binary_multipart_and_gzip(pipeline, tmp_logs):
    png = bytes(range(256)) * 4
    multipart = (
        b'--B\r\nContent-Disposition: form-data; name="title"\r\n\r\nhello\r\n'
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--B--\r\n"
    )
    gz = gzip.compress(b'{"token": "t0k", "n": 1}')
    app = respond_with(200, b"application/json", gz, headers=[(b"content-encoding", b"gzip")])
    mw = LoggingMiddleware(app, pipeline=pipeline)
    call(mw, scope("/u", "POST", [(b"content-type", b"multipart/form-data; boundary=B")]), [multipart])
    call(mw, scope("/b", "POST", [(b"content-type", b"application/octet-stream")]), [png])
    first, second = http_records(pipeline, tmp_logs)
    parts = json.loads(first["request_body"])["multipart"]
    assert parts[0] == {"name": "title", "size": 5, "value": "hello"}
    assert parts[1] == {"name": "file", "filename": "a.png", "content_type": "image/png", "size": len(png)}
    assert first["response_body"] == '{"token": "[REDACTED]", "n": 1}'
    assert first["fields"]["response_body_format"] == "decoded"
    assert (
        second["request_body"] == f"[binary body: {len(png)} bytes, sha256 {hashlib.sha256(png).hexdigest()}]"
    )


def test_streaming_response_and_fastapi_upload(pipeline, tmp_logs):
    app = FastAPI()

    @app.post("/upload")
    async def upload(request: Request):
        digest = hashlib.sha256()
        async for chunk in request.stream():
            digest.update(chunk)
        return {"sha256": digest.hexdigest()}

    @app.get("/stream")
    async def stream():
        async def gen():
            for i in range(3):
                yield f"line {i}\n"

        return StreamingResponse(gen(), media_type="text/plain")

    app.add_middleware(LoggingMiddleware, pipeline=pipeline, max_body_bytes=1000)
    data = bytes(range(256)) * 400
    client = call(
        app,
        scope("/upload", "POST", [(b"content-type", b"application/octet-stream")]),
        [data[i : i + 4096] for i in range(0, len(data), 4096)],
    )
    assert json.loads(client.body)["sha256"] == hashlib.sha256(data).hexdigest()
    client = call(app, scope("/stream"))
    assert client.body == b"line 0\nline 1\nline 2\n"
    up, st = http_records(pipeline, tmp_logs)
    assert up["request_size"] == len(data) and up["fields"]["request_body_truncated"] is True
    assert st["response_body"] == "line 0\nline 1\nline 2\n"


def test_response_helper_type():
    # Response is imported for apps above; keep ruff from flagging it when edited.
    assert Response is not None


def test_configuration_errors_are_clear(pipeline):
    with pytest.raises(ValueError, match="pipeline"):
        LoggingMiddleware(echo_app([]), pipeline=object())
    with pytest.raises(ValueError, match="sample"):
        LoggingMiddleware(echo_app([]), pipeline=pipeline, sample={"/x": 2})
    with pytest.raises(ValueError, match="max_body_bytes"):
        LoggingMiddleware(echo_app([]), pipeline=pipeline, max_body_bytes=-1)
    with pytest.raises(ValueError, match="does not fit the pipeline's handoff_max_bytes=67108864"):
        LoggingMiddleware(echo_app([]), pipeline=pipeline, max_body_bytes=40 << 20)
    with pytest.raises(ValueError, match="redact_headers"):
        LoggingMiddleware(echo_app([]), pipeline=pipeline, redact_headers="authorization")
    with pytest.raises(ValueError, match="trusted_proxies"):
        LoggingMiddleware(echo_app([]), pipeline=pipeline, trusted_proxies=["10.0.0.0/33"])
    with pytest.raises(ValueError, match="request_id_header"):
        LoggingMiddleware(echo_app([]), pipeline=pipeline, request_id_header="X-Réquest-ID")
    # The name goes out in every response: a server refuses the whole response over it.
    for bad_name in ("X Req", "bad:header", "x-id\r\n"):
        with pytest.raises(ValueError, match="request_id_header must be an HTTP header name"):
            LoggingMiddleware(echo_app([]), pipeline=pipeline, request_id_header=bad_name)
    # A string is not a yes/no: "false" would have turned capture on.
    for flag in ("capture_request_body", "capture_response_body", "scrub_values", "echo_request_id"):
        with pytest.raises(ValueError, match=f"{flag} must be True or False, got 'false'"):
            LoggingMiddleware(echo_app([]), pipeline=pipeline, **{flag: "false"})
    with pytest.raises(ValueError, match="max_user_agent_bytes must be a whole number"):
        LoggingMiddleware(echo_app([]), pipeline=pipeline, max_user_agent_bytes=0.5)
    with pytest.raises(ValueError, match="sample must be a mapping"):
        LoggingMiddleware(echo_app([]), pipeline=pipeline, sample="abc")


def handoff_threads() -> int:
    """The middleware's hand-off threads alive in this process, by the name the kernel has
    for them (the core's threads are not Python threads: threading.enumerate() lists none)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += f.read().strip() == "logsluice-http"
        except OSError:  # the thread ended meanwhile
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_close_ends_the_handoff_thread_and_a_later_request_is_still_counted(tmp_path):
    before = handoff_threads()
    served = []
    for i in range(20):
        directory = tmp_path / f"p{i}"
        directory.mkdir()
        p = logsluice.Pipeline(logsluice.LocalFiles(directory))
        mw = LoggingMiddleware(echo_app([]), pipeline=p)
        call(mw, scope(f"/before/{i}"))
        served.append((p, mw, directory))
    # One thread per pipeline (it names itself once it runs).
    wait_for(lambda: handoff_threads() == before + 20, what="20 hand-off threads")
    for p, _, _ in served:
        p.close()
    assert handoff_threads() == before
    for i, (_, _, directory) in enumerate(served):
        assert [r["path"] for r in read_records(directory) if r["kind"] == "http"] == [f"/before/{i}"]

    # A request served after close is not written, and counted as dropped because the
    # pipeline is closed (as before): no hand-off thread comes back for it.
    p, mw, directory = served[0]
    call(mw, scope("/after"))
    assert handoff_threads() == before
    s = p.stats()["local_files"]
    assert (s["accepted"], s["written"], s["dropped"]["closed"], s["in_flight"]) == (2, 1, 1, 0)
    assert p.stats()["http"]["handoff_waiting"] == 0
    assert [r["path"] for r in read_records(directory) if r["kind"] == "http"] == ["/before/0"]
