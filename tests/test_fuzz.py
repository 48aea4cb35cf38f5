"""Every endpoint under generated input (hypothesis), against the in-process app with the real model.

For every request: no 5xx; a 4xx from a JSON endpoint carries a JSON `error`; nothing hangs (the
app answers 503 past `server.request_timeout`, and a 503 fails the test like any 5xx). Static
paths never leave the static folder, and /admin gives nothing without the token. Run with `-s`
to see how many requests were made.
"""

from __future__ import annotations

import json
import sqlite3
import string
from collections import Counter
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote, unquote

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from combot.resources import static_dir
from combot.study import load_study
from combot.web import create_app
from tests.conftest import DEFAULT_STUDY
from tests.openapi_check import check_response

TOKEN = "fuzz-admin-token-0123456789"
REQUESTS: Counter[str] = Counter()
SERVER_ERRORS: list[str] = []
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                       HealthCheck.function_scoped_fixture])
# Pages that answer in HTML (the chat page, the researcher's sign-in); everything else answers JSON.
HTML_PATHS = ("/", "/admin", "/admin/login")


@pytest.fixture(scope="module", autouse=True)
def figures() -> Iterator[None]:
    yield
    print(f"\n[fuzz] requests: {sum(REQUESTS.values())} ({', '.join(f'{k} {n}' for k, n in sorted(REQUESTS.items()))})"
          f", 5xx seen: {len(SERVER_ERRORS)}")


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TestClient]]:
    """Two apps: the default study, and one that asks for consent first."""
    clients: dict[str, TestClient] = {}
    databases: list[Path] = []
    base = {"COMBOT_ADMIN_TOKEN": TOKEN, "COMBOT_RATE_LIMIT": "0", "COMBOT_REQUEST_TIMEOUT": "30"}
    for name, extra in (("plain", {}), ("consent", {"COMBOT_CONSENT": "true"})):
        study = load_study(DEFAULT_STUDY, environ={**base, **extra})
        databases.append(tmp_path_factory.mktemp("fuzz") / f"{name}.db")
        clients[name] = TestClient(create_app(database=str(databases[-1]), study=study), raise_server_exceptions=False)
        clients[name].event_hooks["response"].append(check_response)
        clients[name].__enter__()
    yield clients
    for test_client in clients.values():
        test_client.__exit__(None, None, None)
    for database in databases:
        conn = sqlite3.connect(database)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()


def check(kind: str, method: str, path: str, status: int, body: bytes, content_type: str = "") -> None:
    REQUESTS[kind] += 1
    if status >= 500:
        SERVER_ERRORS.append(f"{method} {path!r} -> {status} {body[:200]!r}")
    assert status < 500, f"{method} {path!r} -> {status} {body[:300]!r}"
    if 400 <= status < 500 and method != "HEAD" and unquote(path.split("?")[0]) not in HTML_PATHS:
        assert content_type.startswith("application/json"), (method, path, status, content_type, body[:200])
        error = json.loads(body)["error"]
        assert isinstance(error, str) and error, body


def checked(kind: str, response: Any) -> Any:
    check(kind, response.request.method, response.request.url.raw_path.decode("ascii"), response.status_code,
          response.content, response.headers.get("content-type", ""))
    return response


# --- what is generated ----------------------------------------------------------------------------

printable = st.characters(min_codepoint=32, max_codepoint=126)
no_surrogates = st.characters(blacklist_categories=("Cs",))
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**30) | st.floats()
           | st.text(max_size=30) | st.text(alphabet=st.characters(), max_size=10))
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
field_values = (json_values | st.text(min_size=1900, max_size=2100) | st.text(alphabet=st.characters(), max_size=40)
                | st.sampled_from(["", " ", "\x00", "\x00hi", "\u202e\u200b", "hi\r\n", "x" * 101, "a@b.co"]))
objects = st.dictionaries(st.sampled_from(["text", "client_message_id", "consent"]) | st.text(max_size=8),
                          field_values, max_size=4)


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # ASCII: lone surrogates come out as \ud800 escapes


def _nested(depth: int, opener: bytes, closer: bytes, inner: bytes = b"") -> bytes:
    return opener * depth + inner + closer * depth


bodies = st.one_of(
    objects.map(_dumps),
    json_values.map(_dumps),
    st.binary(max_size=300),
    st.integers(1, 120_000).map(lambda n: _nested(n, b"[", b"]")),
    st.integers(1, 5_000).map(lambda n: _nested(n, b'{"text":', b"}", b'"x"')),
    st.integers(1, 6_000).map(lambda n: b'{"text": ' + b"9" * n + b"}"),
    st.sampled_from([b'{"text": 1e999999}', b'{"consent": -1e-999999}', b'{"text": NaN}', b'{"text": Infinity}',
                     b'{"client_message_id": 123456789012345678901234567890}', b"", b"   ", b"null", b"\xef\xbb\xbf{}"]),
    st.tuples(st.binary(min_size=1, max_size=20)).map(lambda b: b'{"text": "' + b[0] + b'"}'),  # invalid UTF-8
    st.integers(16_000, 40_000).map(lambda n: b'{"text": "' + b"a" * n + b'"}'),  # oversized
    st.lists(st.integers(0xD800, 0xDFFF).map(chr) | st.characters(), min_size=1, max_size=12).map(
        lambda cs: _dumps({"text": "".join(cs), "client_message_id": "".join(cs)})),  # lone surrogates
)
content_types = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/json; charset=latin-1", ""]) | st.text(
    alphabet=printable, max_size=40)
header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True).filter(
    lambda n: n.lower() not in ("host", "content-length", "transfer-encoding", "connection", "expect", "upgrade"))
headers = st.dictionaries(header_names, st.text(alphabet=printable, max_size=60), max_size=3)
params = st.dictionaries(st.sampled_from(["PROLIFIC_PID", "STUDY_ID", "SESSION_ID", "participant_label"])
                         | st.text(alphabet=no_surrogates, max_size=10),
                         st.text(alphabet=no_surrogates, max_size=300), max_size=4)
methods = st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])


def send(c: TestClient, kind: str, method: str, url: str, body: bytes = b"", content_type: str | None = None,
         extra: dict[str, str] | None = None, query: dict[str, str] | None = None) -> Any:
    sent = dict(extra or {})
    if content_type is not None:
        sent["content-type"] = content_type
    return checked(kind, c.request(method, url, content=body or None, headers=sent, params=query))


# --- the participant API ------------------------------------------------------------------------

@settings(FUZZ, max_examples=400)
@given(app=st.sampled_from(["plain", "consent"]), body=bodies, content_type=content_types, extra=headers, query=params)
def test_create_session(apps: dict[str, TestClient], app: str, body: bytes, content_type: str,
                        extra: dict[str, str], query: dict[str, str]) -> None:
    response = send(apps[app], "POST /api/sessions", "POST", "/api/sessions", body, content_type, extra, query)
    if response.status_code in (200, 201):
        assert response.json()["session_id"] and response.json()["expects"] in ("message", "email", "done")


class Sessions:
    """A live session to write to; a new one once the conversation has ended."""

    def __init__(self) -> None:
        self.token = ""

    def current(self, c: TestClient) -> str:
        if not self.token:
            self.token = c.post("/api/sessions", json={}).json()["session_id"]
        return self.token


SESSIONS = Sessions()


def _variant(token: str, how: str) -> str:
    return {"live": token, "prefix": token[:16], "longer": token + "x", "shorter": token[:-1], "case": token.swapcase(),
            "percent": "%25", "star": "*", "like": token[:8] + "%"}.get(how, how)


targets = st.sampled_from(["live"] * 6 + ["prefix", "longer", "shorter", "case", "percent", "star", "like"]) | st.text(
    max_size=120)


@settings(FUZZ, max_examples=1000)
@given(target=targets, body=bodies | objects.map(_dumps), content_type=content_types, extra=headers)
def test_post_message(apps: dict[str, TestClient], target: str, body: bytes, content_type: str,
                      extra: dict[str, str]) -> None:
    c = apps["plain"]
    session = _variant(SESSIONS.current(c), target)
    response = send(c, "POST /api/sessions/{id}/messages", "POST", f"/api/sessions/{quote(session, safe='')}/messages",
                    body, content_type, extra)
    if response.status_code == 200 and response.json()["expects"] == "done" or response.status_code == 409:
        SESSIONS.token = ""


@settings(FUZZ, max_examples=500)
@given(target=targets, method=methods, suffix=st.sampled_from(["", "/", "/messages", "/messages/", "/x", "/.."]))
def test_session_paths_and_methods(apps: dict[str, TestClient], target: str, method: str, suffix: str) -> None:
    c = apps["plain"]
    session = _variant(SESSIONS.current(c), target)
    response = send(c, "any /api/sessions/...", method, f"/api/sessions/{quote(session, safe='')}{suffix}")
    if response.status_code == 200 and method == "GET" and target != "live":
        # Only the exact token opens a conversation.
        assert session == SESSIONS.token


@settings(FUZZ, max_examples=300)
@given(path=st.sampled_from(["/", "/healthz", "/api/consent", "/api/declines", "/api/sessions", "/favicon.ico",
                             "/api", "/api/", "/index.html", "/static", "/static/"]) | st.text(max_size=60).map(
    lambda t: "/" + quote(t)), method=methods, app=st.sampled_from(["plain", "consent"]), body=bodies,
       query=params)
def test_every_other_address(apps: dict[str, TestClient], path: str, method: str, app: str, body: bytes,
                             query: dict[str, str]) -> None:
    send(apps[app], "any other address", method, path, body if method not in ("GET", "HEAD") else b"",
         "application/json", query=query)


# --- static files -------------------------------------------------------------------------------

STATIC_FILES = {p.read_bytes() for p in static_dir().rglob("*") if p.is_file()}
SECRETS = [DEFAULT_STUDY.read_bytes()[:200], b"root:x:0:0", b"[project]"]
segments = st.sampled_from(["..", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "..%2f", "..%2F", "..%5c", "..\\", "%252e%252e",
                            "....//", ".", "", "static", "chat.js", "index.html", "logos", "%00", "a%00.js",
                            "combot.toml", "pyproject.toml", "etc", "passwd", "%c0%ae%c0%ae", "~", "%2f", "//",
                            "x" * 300]) | st.text(alphabet=string.ascii_letters + "._%/\\", max_size=12)


async def _raw_request(app: Any, raw_path: bytes, method: str = "GET",
                       body: list[dict[str, Any]] | None = None) -> tuple[int, bytes, str]:
    """A request with the path exactly as given, as a server hands it over (httpx would normalise
    `..`); `body` is what the app receives, e.g. part of a body and then a disconnect."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": unquote(raw_path.decode("ascii")), "raw_path": raw_path, "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
    sent: list[dict[str, Any]] = []
    incoming = list(body or [{"type": "http.request", "body": b"", "more_body": False}])
    done = anyio.Event()

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await done.wait()  # as a server does: the client goes away only after the response
        return {"type": "http.disconnect"}

    async def send_(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    await app(scope, receive, send_)
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    content_type = dict(start["headers"]).get(b"content-type", b"").decode("latin-1")
    return int(start["status"]), content, content_type


@settings(FUZZ, max_examples=600)
@given(parts=st.lists(segments, min_size=1, max_size=8))
def test_static_paths_never_leave_the_static_folder(apps: dict[str, TestClient], parts: list[str]) -> None:
    c = apps["plain"]
    raw = ("/static/" + "/".join(parts)).encode("ascii")
    status, body, content_type = c.portal.call(_raw_request, c.app, raw)  # type: ignore[union-attr]
    check("GET /static/...", "GET", raw.decode(), status, body, content_type)
    assert not any(secret in body for secret in SECRETS)
    if status == 200:
        assert body in STATIC_FILES


# --- the researcher's side ----------------------------------------------------------------------

admin_paths = st.sampled_from(["/admin", "/admin/", "/admin/login", "/admin/logout", "/admin/api/stats",
                               "/admin/export.zip", "/admin/api", "/admin/%2e%2e/api/stats"]) | st.text(
    max_size=40).map(lambda t: "/admin/" + quote(t))
wrong_tokens = st.sampled_from(["", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), " " + TOKEN[1:], "null"]) | st.text(
    alphabet=printable, max_size=60)


@settings(FUZZ, max_examples=600)
@given(path=admin_paths, method=methods, token=wrong_tokens,
       how=st.sampled_from(["bearer", "basic", "cookie", "form", "query", "none"]))
def test_admin_gives_nothing_without_the_token(apps: dict[str, TestClient], path: str, method: str, token: str,
                                               how: str) -> None:
    c = apps["plain"]
    extra: dict[str, str] = {}
    body = b""
    query: dict[str, str] = {}
    if how == "bearer":
        extra["authorization"] = "Bearer " + token
    elif how == "basic":
        extra["authorization"] = "Basic " + token
    elif how == "cookie":
        extra["cookie"] = f"combot_admin={quote(token)}"
    elif how == "form":
        body = ("token=" + quote(token)).encode()
    elif how == "query":
        query = {"token": token}
    c.cookies.clear()
    response = send(c, "/admin without the token", method, path, body if method not in ("GET", "HEAD") else b"",
                    "application/x-www-form-urlencoded" if body else None, extra, query)
    # 404: an address even the catch-all does not match (a newline in it); it says nothing either.
    assert response.status_code in (401, 404, 405), (method, path, response.status_code)
    assert b'"totals"' not in response.content and not response.content.startswith(b"PK")
    assert "set-cookie" not in response.headers


@settings(FUZZ, max_examples=150)
@given(query=st.dictionaries(st.sampled_from(["anonymise", "format", "x"]), st.sampled_from(
    ["1", "0", "true", "yes", "csv", "jsonl", "xlsx", "", "../../etc", "%00"]) | st.text(alphabet=no_surrogates,
                                                                                           max_size=20), max_size=3),
       path=st.sampled_from(["/admin/export.zip", "/admin/api/stats", "/admin", "/admin/nothing"]))
def test_admin_with_the_token_takes_any_query(apps: dict[str, TestClient], query: dict[str, str], path: str) -> None:
    c = apps["plain"]
    response = send(c, "/admin with the token", "GET", path, extra={"authorization": f"Bearer {TOKEN}"}, query=query)
    assert response.status_code in (200, 404)


@pytest.mark.parametrize("body", [b'{"text": "\\ud800 my parcel never came"}', b'{"text": "hi", "client_message_id": "\\udfff"}',
                                  b'{"text": "hi", "x": ["\\udbff\\udbff"]}'])
def test_a_lone_surrogate_is_a_400_not_a_500(apps: dict[str, TestClient], body: bytes) -> None:
    # Found by test_post_message: SQLite and the tokenizer cannot encode "\ud800" as UTF-8.
    c = apps["plain"]
    for path in (f"/api/sessions/{SESSIONS.current(c)}/messages", "/api/sessions"):
        response = c.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]


@pytest.mark.parametrize("app, path", [("plain", "/api/sessions"), ("plain", "/api/sessions/{live}/messages"),
                                       ("consent", "/api/declines"), ("plain", "/admin/login")])
def test_a_client_gone_mid_body_is_no_server_error(apps: dict[str, TestClient], app: str, path: str) -> None:
    # Found over a real socket: a page closed mid-upload raised ClientDisconnect, answered (and
    # counted on the dashboard) as a 500.
    c = apps[app]
    raw = path.replace("{live}", SESSIONS.current(apps["plain"])).encode()
    cut = [{"type": "http.request", "body": b'{"text": "my parc', "more_body": True}, {"type": "http.disconnect"}]
    status, body, content_type = c.portal.call(_raw_request, c.app, raw, "POST", cut)  # type: ignore[union-attr]
    check("client gone mid-body", "POST", path, status, body, content_type if path != "/admin/login" else "")
