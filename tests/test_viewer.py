"""The viewer's JSON API, auth and security headers, over real uvicorn and a real pipeline
writing LocalFiles."""

from __future__ import annotations

import asyncio
import csv
import io
import json

import httpx
import logsluice
import pytest
from harness._net import wait_until
from loguru import logger
from viewer_support import TOKEN, XSS_CORPUS, ServerThread, client, host_app, make_reader, settle

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A host app with traffic and Loguru records already written, the viewer at /logs."""
    directory = tmp_path_factory.mktemp("viewer-logs")
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(directory, batch_max_delay=0.05))
    handler = pipeline.attach(logger, level="DEBUG")
    reader = make_reader(directory)
    app, view = host_app(pipeline, reader)
    with ServerThread(app) as server:
        with httpx.Client(base_url=server.base, timeout=30) as c:
            for i in range(20):
                c.get(f"/items/{i}")
            c.get("/items/1234")
        for text in XSS_CORPUS:
            logger.bind(payload=text, url="javascript:alert(9)").warning(text)
        logger.bind(user={"id": 42}).info("user 42 checked out")
        logger.info('=HYPERLINK("https://evil.invalid","x")')
        settle(pipeline, reader, 21)
        server.pipeline, server.view, server.directory = pipeline, view, directory
        yield server
        view.close()
    logger.remove(handler)
    pipeline.close()


def test_mounting_without_auth_raises(tmp_logs):
    reader = make_reader(tmp_logs)
    with pytest.raises(ValueError, match="auth"):
        logsluice.viewer(reader)
    assert logsluice.viewer(reader, allow_anonymous=True) is not None
    with pytest.raises(ValueError, match="auth must be a callable"):
        logsluice.viewer(reader, auth="secret")


def test_records_listed_and_filtered(site):
    with client(site.base) as c:
        r = c.get("/logs/api/records", params={"since": "1h", "limit": 500})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-content-type-options"] == "nosniff"
        page = r.json()
        messages = [rec["message"] for rec in page["records"]]
        assert "user 42 checked out" in messages
        assert all(text in messages for text in XSS_CORPUS)
        assert sum(1 for rec in page["records"] if rec["kind"] == "http") == 21
        assert page["partial"] is False

        errors = c.get("/logs/api/records", params={"min_level": "ERROR"}).json()["records"]
        assert [e["message"] for e in errors] == ["item 1234 is missing"]

        http_404 = c.get("/logs/api/records", params={"kind": "http", "status": "4xx"}).json()["records"]
        assert [(h["path"], h["status"]) for h in http_404] == [("/items/1234", 404)]

        by_field = c.get("/logs/api/records", params={"field.user.id": "42"}).json()["records"]
        assert [b["message"] for b in by_field] == ["user 42 checked out"]


def test_exclusions_through_the_api(site):
    with client(site.base) as c:
        everything = c.get("/logs/api/records", params={"kind": "http", "limit": 500}).json()["records"]
        assert {h["status"] for h in everything} == {200, 404}
        # One value by shorthand, several as JSON; the streams and summaries take the same.
        no_404 = c.get("/logs/api/records", params={"kind": "http", "exclude.status": "404", "limit": 500})
        assert no_404.status_code == 200, no_404.text
        assert sorted(h["path"] for h in no_404.json()["records"]) == sorted(
            h["path"] for h in everything if h["status"] != 404
        )
        params = {"exclude": json.dumps({"path": ["/items/1", "/items/2"], "kind": "app"}), "limit": 500}
        rest = c.get("/logs/api/records", params=params).json()["records"]
        assert rest and all(
            r["kind"] == "http" and not r["path"].startswith(("/items/1", "/items/2")) for r in rest
        )
        assert len(rest) == sum(1 for h in everything if not h["path"].startswith(("/items/1", "/items/2")))
        summary = c.get("/logs/api/summary", params={"by": "status", "exclude.status": "404"}).json()
        assert [g["key"] for g in summary["groups"]] in ([{"status": 200}], [200])


def test_keyset_paging_through_the_api(site):
    with client(site.base) as c:
        seen, cursor = [], None
        while True:
            params = {"limit": 7, "kind": "app"}
            if cursor:
                params["cursor"] = cursor
            page = c.get("/logs/api/records", params=params).json()
            seen += [rec["id"] for rec in page["records"]]
            cursor = page["next"]
            if not cursor:
                break
        everything = c.get("/logs/api/records", params={"limit": 1000, "kind": "app"}).json()["records"]
        assert seen == [rec["id"] for rec in everything]
        assert len(seen) == len(set(seen)) > 7


def test_request_and_context(site):
    with client(site.base) as c:
        access = c.get("/logs/api/records", params={"kind": "http", "status": "404"}).json()["records"][0]
        rid = access["request_id"]
        assert rid
        view = c.get(f"/logs/api/requests/{rid}")
        assert view.status_code == 200, view.text
        body = view.json()
        assert body["access"]["path"] == "/items/1234"
        assert sorted(r["message"] for r in body["records"]) == [
            "item 1234 is missing",
            "looking up item 1234",
        ]

        latest = c.get("/logs/api/requests/latest", params={"status": "4xx"}).json()
        assert latest["request_id"] == rid and latest["access"]["status"] == 404
        none = c.get("/logs/api/requests/latest", params={"status": "5xx"})
        assert none.status_code == 404 and none.json() == {"error": "no request matches"}

        both = c.get("/logs/api/records", params={"level": "ERROR,WARNING", "kind": "app", "limit": 1000})
        assert {r["level"] for r in both.json()["records"]} == {"ERROR", "WARNING"}

        anchor = body["records"][0]
        ctx = c.get(f"/logs/api/records/{anchor['id']}/context", params={"before": 3, "after": 3})
        assert ctx.status_code == 200, ctx.text
        around = ctx.json()
        assert around["record"]["id"] == anchor["id"]
        assert 0 < len(around["before"]) <= 3 and 0 < len(around["after"]) <= 3
        before, after = around["before"][-1], around["after"][0]
        assert before["ts"] <= anchor["ts"] <= after["ts"]


def test_export_ndjson_and_csv(site):
    with client(site.base) as c:
        r = c.get("/logs/api/export", params={"format": "ndjson", "kind": "app"})
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.text.splitlines()]
        listed = c.get("/logs/api/records", params={"kind": "app", "limit": 1000}).json()["records"]
        assert [x["id"] for x in lines] == [x["id"] for x in listed]

        r = c.get("/logs/api/export", params={"format": "csv", "min_level": "WARNING"})
        rows = list(csv.reader(io.StringIO(r.text)))
        assert rows[0][:3] == ["ts", "level", "kind"]
        messages = {row[4] for row in rows[1:]}
        assert "<img src=x onerror=alert(1)>" in messages
        # Spreadsheet formulas from log content arrive as text.
        r = c.get(
            "/logs/api/export", params={"format": "csv", "columns": "message,user.id", "text": "hyperlink"}
        )
        assert list(csv.reader(io.StringIO(r.text))) == [
            ["message", "user.id"],
            ['\'=HYPERLINK("https://evil.invalid","x")', ""],
        ]
        r = c.get(
            "/logs/api/export", params={"format": "csv", "columns": "message,user.id", "text": "user 42"}
        )
        assert list(csv.reader(io.StringIO(r.text)))[1] == ["user 42 checked out", "42"]
        assert c.get("/logs/api/export", params={"format": "xml"}).status_code == 400
        assert c.get("/logs/api/export", params={"columns": "a b"}).status_code == 400


def test_status_shows_pipeline_stats(site):
    with client(site.base) as c:
        body = c.get("/logs/api/status").json()
    stats = body["pipeline"]["local_files"]
    assert stats["written"] >= 21 and stats["accepted"] >= stats["written"]
    assert body["streams"]["max_subscribers"] == 200


def test_auth_refused_and_accepted(site):
    with client(site.base, token=None) as c:
        for path in (
            "/logs/",
            "/logs/api/records",
            "/logs/api/status",
            "/logs/api/stream",
            "/logs/static/app.js",
        ):
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.json() == {"error": "authentication required"}
        assert (
            c.get("/logs/api/records", headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}).status_code
            == 401
        )
        # The page's token is traded for an HttpOnly cookie and removed from the address.
        r = c.get("/logs/", params={"token": TOKEN})
        assert r.status_code == 303 and r.headers["location"] == "./"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/logs/" in cookie
    with client(site.base, token=None, cookies={"logsluice_token": TOKEN}) as c:
        assert c.get("/logs/api/records").status_code == 200


def test_async_auth_callable_sees_the_connection(tmp_logs):
    calls = []

    async def require_admin(conn):
        calls.append((conn.scope["type"], conn.headers.get("x-role")))
        await asyncio.sleep(0)
        return conn.headers.get("x-role") == "admin"

    from fastapi import FastAPI

    app = FastAPI()
    app.mount("/logs", logsluice.viewer(make_reader(tmp_logs), auth=require_admin))
    with ServerThread(app) as server, httpx.Client(base_url=server.base) as c:
        assert c.get("/logs/api/records").status_code == 401
        assert c.get("/logs/api/records", headers={"x-role": "admin"}).status_code == 200
    assert calls == [("http", None), ("http", "admin")]


def test_page_headers(site):
    with client(site.base) as c:
        r = c.get("/logs/")
        assert r.status_code == 200
        csp = r.headers["content-security-policy"]
        for part in (
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ):
            assert part in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert '<script src="static/app.js"' in r.text
        js = c.get("/logs/static/app.js")
        assert js.headers["content-type"].startswith("text/javascript")
        assert "innerHTML" not in js.text and "insertAdjacentHTML" not in js.text and "eval(" not in js.text
        # Without the trailing slash: a redirect that keeps relative links under the mount.
        r = c.get("/logs")
        assert r.status_code == 307 and r.headers["location"].endswith("/logs/")
        # Paths are never reflected.
        r = c.get("/logs/<script>alert(1)</script>")
        assert r.status_code == 404 and b"<script>" not in r.content


BAD_INPUT = [
    {"min_level": "LOUD"},
    {"since": "yesterday-ish"},
    {"status": "6xx"},
    {"limit": "abc"},
    {"limit": "-5"},
    {"cursor": "not-a-cursor"},
    {"order": "sideways"},
    {"fields": "{not json"},
    {"unknown": "1"},
    {"field.a;drop": "1"},
    {"exclude.colour": "red"},
    {"exclude.status": "6xx"},
    {"exclude": "{not json"},
    {"exclude": '["route"]'},
]


@pytest.mark.parametrize("params", BAD_INPUT, ids=lambda p: ",".join(p))
def test_bad_input_is_a_400_with_json(site, params):
    with client(site.base) as c:
        r = c.get("/logs/api/records", params=params)
    assert r.status_code == 400, r.text[:300]
    assert r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"error"} and "Traceback" not in r.text


INJECTIONS = ["' OR 1=1 --", "x'); DROP TABLE logs; --", "%' OR '%'='", "\\", "\x00", "{}[]$ne"]


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize("name", ["logger", "route", "text", "request_id", "path", "field.user.id"])
def test_injection_attempts_are_data(site, name, value):
    with client(site.base) as c:
        r = c.get("/logs/api/records", params={name: value})
    assert r.status_code in (200, 400), r.text[:300]
    if r.status_code == 200:
        assert r.json()["records"] == []


def test_read_only_and_unknown_routes(site):
    with client(site.base) as c:
        assert c.post("/logs/api/records").status_code == 405
        r = c.get("/logs/api/nothing")
        assert r.status_code == 404 and r.json() == {"error": "no such API endpoint"}


def test_store_unavailable_is_a_503_not_a_traceback(tmp_logs):
    class Broken:
        async def aquery(self, **kw):
            raise ConnectionError("password=hunter2 refused")

    view = logsluice.viewer(Broken(), allow_anonymous=True)
    with ServerThread(view) as server, httpx.Client(base_url=server.base) as c:
        r = c.get("/api/records")
    assert r.status_code == 503 and r.json() == {"error": "the log store is unavailable"}
    assert "hunter2" not in r.text


def test_viewer_status_after_pipeline_close(tmp_logs):
    pipeline = logsluice.Pipeline(logsluice.LocalFiles(tmp_logs))
    view = logsluice.viewer(make_reader(tmp_logs), allow_anonymous=True, pipeline=pipeline)
    pipeline.close()
    assert view._hub.closed
    wait_until(lambda: view._hub.closed, 5, "hub closed")


# docs/viewer.md, as a user's module: what a type checker must accept (the package ships py.typed).
DOCUMENTED_USAGE = """
import os

import logsluice
from fastapi import FastAPI
from starlette.applications import Starlette

app = FastAPI()
reader = logsluice.Reader.from_env()


async def require_admin(conn: object) -> bool:
    return bool(getattr(conn, "headers", None))


app.mount("/logs", logsluice.viewer(reader, auth=require_admin))
app.mount("/logs2", logsluice.viewer(reader, auth=logsluice.viewer.token_auth(os.environ["LOGS_TOKEN"])))
Starlette().mount("/logs", logsluice.viewer(reader, auth=logsluice.viewer.token_auth()))
token: str = logsluice.viewer.token_auth().token
"""


def test_documented_usage_type_checks_with_mypy(tmp_path):
    api = pytest.importorskip("mypy.api", reason="mypy is not installed in this environment")
    import sys

    module = tmp_path / "documented_usage.py"
    module.write_text(DOCUMENTED_USAGE)
    out, err, code = api.run(
        [str(module), "--python-executable", sys.executable, "--no-incremental", "--no-error-summary"]
    )
    assert code == 0, out + err


def test_token_auth_is_a_declared_attribute_and_the_viewer_an_asgi_app():
    """What a type checker reads (mypy is not needed to see it): ``logsluice.viewer.token_auth``
    declared on the type of ``logsluice.viewer`` (an attribute set on a function afterwards is
    invisible to mypy: '"def viewer(...)" has no attribute "token_auth"'), and the app's
    ``__call__`` typed exactly as Starlette's ``ASGIApp`` (a ``dict`` scope is not a
    ``MutableMapping`` parameter: arg-type on ``app.mount``)."""
    import inspect
    import typing

    import starlette.types
    from logsluice.viewer import TokenAuth, Viewer, token_auth

    declared = inspect.getattr_static(type(logsluice.viewer), "token_auth")
    assert isinstance(declared, staticmethod) and declared.__func__ is token_auth
    assert logsluice.viewer.token_auth is token_auth
    assert logsluice.viewer.TokenAuth is TokenAuth and logsluice.viewer.Viewer is Viewer
    assert typing.get_type_hints(token_auth)["return"] is TokenAuth
    assert typing.get_type_hints(TokenAuth)["token"] is str
    auth = logsluice.viewer.token_auth(TOKEN)
    assert auth.token == TOKEN and TOKEN not in repr(auth)
    assert len(logsluice.viewer.token_auth().token) >= 16

    hints = typing.get_type_hints(Viewer.__call__)
    assert hints["scope"] == starlette.types.Scope
    assert hints["receive"] == starlette.types.Receive
    assert hints["send"] == starlette.types.Send
    assert typing.get_type_hints(type(logsluice.viewer).__call__)["return"] is Viewer


def test_the_documented_mount_serves_with_a_token(tmp_logs):
    """The two documented lines, run: ``app.mount("/logs", logsluice.viewer(reader,
    auth=logsluice.viewer.token_auth(token)))`` answers with the token and refuses without."""
    from fastapi import FastAPI

    app = FastAPI()
    app.mount("/logs", logsluice.viewer(make_reader(tmp_logs), auth=logsluice.viewer.token_auth(TOKEN)))
    with ServerThread(app) as server:
        with client(server.base) as c:
            assert c.get("/logs/api/records").status_code == 200
        with client(server.base, token=None) as c:
            assert c.get("/logs/api/records").status_code == 401


def test_latest_request_is_the_readers_request_latest(tmp_logs):
    """``/api/requests/latest?status=5xx`` is ``reader.arequest("latest", status="5xx")``: the
    viewer has no lookup of its own (it used one through ``latest_request`` in a thread)."""
    calls = []

    class OnlyRequest:  # a reader with the documented async methods, and no latest_request
        async def aquery(self, **kw):
            return {"records": [], "next": None, "partial": False}

        async def arequest(self, request_id, **kw):
            calls.append((request_id, kw))
            if kw.get("status") == "4xx":
                return {"request_id": "latest", "access": None, "records": [], "trace": []}
            return {"request_id": "r-1", "access": {"status": 503}, "records": [], "trace": []}

    view = logsluice.viewer(OnlyRequest(), allow_anonymous=True)
    with ServerThread(view) as server, httpx.Client(base_url=server.base) as c:
        r = c.get("/api/requests/latest", params={"status": "5xx", "grace": "1m"})
        assert r.status_code == 200, r.text
        assert r.json()["request_id"] == "r-1"
        none = c.get("/api/requests/latest", params={"status": "4xx"})
        assert none.status_code == 404 and none.json() == {"error": "no request matches"}
        # Filters go with "latest" only; the request id is what it finds.
        assert c.get("/api/requests/r-1", params={"status": "5xx"}).status_code == 400
        assert c.get("/api/requests/latest", params={"request_id": "x"}).status_code == 400
    assert calls == [("latest", {"status": "5xx", "grace": "1m"}), ("latest", {"status": "4xx"})]


def test_a_child_forked_while_the_signal_lock_is_held_can_take_it():
    import os

    from logsluice.viewer import _app

    with _app._signals_lock:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if _app._signals_lock.acquire(timeout=2) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
