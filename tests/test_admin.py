"""The dashboard: the token, 401s everywhere without it, the numbers, the download, and the page in Chromium."""

from __future__ import annotations

import asyncio
import io
import os
import sqlite3
import stat
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
from starlette.testclient import TestClient

from combot import admin, engine, monitor, store, web
from combot.study import load_study
from tests.conftest import CHROMIUM, DEFAULT_STUDY, free_port
from tests.inprocess import Client, FakeClassifier, client_factory, finish

TOKEN = "researcher-token-for-tests-0123456789"
SCREENSHOT = Path("/tmp/combot-dashboard.png")
ADMIN_PATHS = ["/admin", "/admin/api/stats", "/admin/export.zip", "/admin/export.zip?anonymise=1", "/admin/anything",
               "/admin/login"]


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_app: Callable[..., TestClient]) -> Client:
    return client_factory(tmp_path, monkeypatch, started_app)


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_every_admin_address_is_401_without_the_right_token(client: Client) -> None:
    c = client(environ={"COMBOT_ADMIN_TOKEN": TOKEN})
    for path in ADMIN_PATHS:
        for headers in ({}, bearer("wrong"), bearer(""), {"Authorization": TOKEN}, {"Cookie": f"combot_admin={TOKEN}"},
                        {"Cookie": "combot_admin=" + admin.cookie_value("wrong")}):
            response = c.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert TOKEN not in response.text
    for path in ("/admin/logout", "/admin/anything"):
        assert c.post(path).status_code == 401
    # The token is never accepted from the URL.
    assert c.get(f"/admin/api/stats?token={TOKEN}").status_code == 401
    assert c.get("/admin/api/stats", headers=bearer()).status_code == 200
    assert c.get("/admin/anything", headers=bearer()).status_code == 404


def test_a_generated_token_is_stored_beside_the_database_for_the_owner_only(tmp_path: Path) -> None:
    settings = load_study(DEFAULT_STUDY, environ={}).settings
    first = admin.ensure_token(settings, tmp_path / "study.db")
    assert first.created and first.source == str(tmp_path / "study.db.admin-token")
    assert stat.S_IMODE(os.stat(first.source).st_mode) == 0o600
    again = admin.ensure_token(settings, tmp_path / "study.db")
    assert not again.created and again.value == first.value and len(first.value) >= 40
    configured = load_study(DEFAULT_STUDY, environ={"COMBOT_ADMIN_TOKEN": "from-env"}).settings
    assert admin.ensure_token(configured, tmp_path / "study.db").value == "from-env"


def test_workers_starting_together_agree_on_one_token(tmp_path: Path) -> None:
    settings = load_study(DEFAULT_STUDY, environ={}).settings
    found: list[str] = []
    threads = [threading.Thread(target=lambda: found.append(admin.ensure_token(settings, tmp_path / "db").value))
               for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(found)) == 1 and len(found) == 16
    assert [p.name for p in tmp_path.iterdir()] == ["db.admin-token"]


def test_the_login_form_sets_a_strict_httponly_cookie(client: Client) -> None:
    c = client(environ={"COMBOT_ADMIN_TOKEN": TOKEN})
    page = c.get("/admin")
    assert page.status_code == 401 and "<form" in page.text and 'name="token"' in page.text
    wrong = c.post("/admin/login", data={"token": "nope"}, follow_redirects=False)
    assert wrong.status_code == 401 and "not right" in wrong.text and "set-cookie" not in wrong.headers
    right = c.post("/admin/login", data={"token": TOKEN}, follow_redirects=False)
    assert right.status_code == 303 and TOKEN not in right.headers["location"]
    cookie = right.headers["set-cookie"].lower()
    # No Path: the browser scopes it to the folder of /admin/login, /admin (or /study1/admin under a
    # proxy's sub-path); not Secure over plain http.
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=" not in cookie
    assert "secure" not in cookie
    assert TOKEN.lower() not in cookie
    dashboard = c.get("/admin")
    assert dashboard.status_code == 200 and "admin.js" in dashboard.text
    assert "frame-ancestors 'none'" in dashboard.headers["content-security-policy"]
    assert c.get("/admin/api/stats").status_code == 200
    assert c.post("/admin/logout", follow_redirects=False).status_code == 303
    c.cookies.clear()
    assert c.get("/admin/api/stats").status_code == 401


def test_the_numbers(client: Client, tmp_path: Path) -> None:
    c = client(environ={"COMBOT_ADMIN_TOKEN": TOKEN, "COMBOT_CONSENT": "true"})
    sessions = [c.post("/api/sessions", json={"consent": True}).json()["session_id"] for _ in range(10)]
    c.post("/api/declines")
    for session in sessions[:3]:
        assert finish(c, session)["expects"] == "done"
    c.post(f"/api/sessions/{sessions[3]}/messages", json={"text": "The courier lost my parcel."})
    with sqlite3.connect(tmp_path / "web.db") as conn:  # one participant went quiet an hour ago
        conn.execute("UPDATE participants SET updated_at = ? WHERE token = ?", (store.ago(3600), sessions[9]))
    numbers = c.get("/admin/api/stats", headers=bearer()).json()
    assert numbers["totals"] == {"started": 10, "finished": 3, "active": 6, "abandoned": 1, "declined": 1}
    cells = numbers["cells"]
    assert len(cells) == 8 and [c["number"] for c in cells] == list(range(1, 9))
    assert sorted(cell["started"] for cell in cells) == [1, 1, 1, 1, 1, 1, 2, 2]
    funnel = {step["step"]: step["n"] for step in numbers["funnel"]}
    assert funnel["opened the chat"] == 10 and funnel["first message (problem)"] == 4
    assert funnel["message 5"] == 3 and funnel["finished (e-mail given)"] == 3  # no email_skip_words here
    assert {p["type"]: p["n"] for p in numbers["problem_types"]} == {"A": 0, "B": 4, "C": 0, "Other": 0, "not yet": 6}
    replies = numbers["replies"]
    assert replies["replies"] == 3 * 6 + 1 and replies["errors"] == 0 and replies["success_percent"] == 100
    assert replies["p50_ms"] is not None and replies["p95_ms"] >= replies["p50_ms"]
    assert [w["pid"] for w in numbers["workers"]] == [os.getpid()] and numbers["workers"][0]["rss_bytes"] > 10**6
    assert numbers["memory"]["total_bytes"] > 0 and numbers["timeline"][-1]["replies"] >= 1
    assert numbers["warnings"] == [] or all("Memory" in w for w in numbers["warnings"])


def test_server_errors_count_against_the_success_rate(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    c = client(environ={"COMBOT_ADMIN_TOKEN": TOKEN, "COMBOT_ADMIN_SUCCESS_WARN_PERCENT": "95"})
    session = c.post("/api/sessions", json={}).json()["session_id"]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the engine broke")

    monkeypatch.setattr(engine, "respond", broken)
    for _ in range(3):
        assert c.post(f"/api/sessions/{session}/messages", json={"text": "hello there"}).status_code == 500
    numbers = c.get("/admin/api/stats", headers=bearer()).json()
    assert numbers["replies"]["errors"] == 3 and numbers["replies"]["success_percent"] == 25.0
    assert any("succeeded" in w and "95" in w for w in numbers["warnings"])


def test_warnings_follow_the_thresholds() -> None:
    thresholds = {"memory_percent": 80.0, "reply_seconds": 30.0, "success_percent": 95.0}
    calm = monitor.warnings({"used_percent": 40.0}, {"mean_ms": 2000, "success_percent": 100.0, "window_minutes": 15},
                            thresholds)
    assert calm == []
    loud = monitor.warnings({"used_percent": 91.0}, {"mean_ms": 31000, "success_percent": 90.0, "window_minutes": 15},
                            thresholds)
    assert len(loud) == 3 and "91%" in loud[0] and "31.0 s" in loud[1] and "90.0%" in loud[2]


def test_the_download_is_a_zip_of_the_export(client: Client) -> None:
    c = client(environ={"COMBOT_ADMIN_TOKEN": TOKEN})
    finish(c, c.post("/api/sessions", params={"PROLIFIC_PID": "pp"}, json={}).json()["session_id"])
    full = c.get("/admin/export.zip", headers=bearer())
    assert full.status_code == 200 and full.headers["content-type"] == "application/zip"
    assert "attachment" in full.headers["content-disposition"]
    names = zipfile.ZipFile(io.BytesIO(full.content)).namelist()
    versions = [n for n in names if n.startswith("study/")]
    assert sorted(set(names) - set(versions)) == ["MANIFEST.json", "chain.csv", "codebook.md", "messages.csv",
                                                        "participants.csv", "personal.csv"]
    assert len(versions) == 1 and versions[0].endswith(".toml")
    anonymous = zipfile.ZipFile(io.BytesIO(c.get("/admin/export.zip?anonymise=1", headers=bearer()).content))
    assert "personal.csv" not in anonymous.namelist()
    assert b"someone@example.com" not in b"".join(anonymous.read(n) for n in anonymous.namelist())
    jsonl = zipfile.ZipFile(io.BytesIO(c.get("/admin/export.zip?format=jsonl", headers=bearer()).content))
    assert "messages.jsonl" in jsonl.namelist()


# --- the page in a real browser -------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """The app on a loopback port (Hypercorn in a thread, the stand-in classifier); returns its URL."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    monkeypatch.setattr(web, "load_classifier", lambda study: FakeClassifier())
    stops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, threading.Thread]] = []

    def start(environ: dict[str, str]) -> str:
        study = load_study(DEFAULT_STUDY, environ=environ)
        app = web.create_app(database=str(tmp_path / "live.db"), study=study)
        config = Config()
        port = free_port()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()

        def run() -> None:
            loop.run_until_complete(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        stops.append((loop, stop, thread))
        url = f"http://127.0.0.1:{port}/"
        for _ in range(100):
            try:
                if httpx.get(url + "healthz", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            threading.Event().wait(0.1)
        raise AssertionError("the in-thread server did not start")

    yield start
    for loop, stop, thread in stops:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


@pytest.mark.slow
def test_the_dashboard_in_headless_chromium(served: Callable[..., str], tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed")
    url = served({"COMBOT_ADMIN_TOKEN": TOKEN})
    with httpx.Client(base_url=url, timeout=30) as http:
        sessions = [http.post("api/sessions", json={}).json()["session_id"] for _ in range(5)]
        http.post(f"api/sessions/{sessions[0]}/messages", json={"text": "=1+1 my parcel <b>never</b> came"})

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1600})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            response = page.goto(url + "admin")
            assert response is not None and response.status == 401
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_url(url + "admin")
            assert TOKEN not in page.url
            errors.clear()  # the sign-in page itself came with its 401
            expect = sync_api.expect
            expect(page.locator("#total-started")).to_have_text("5", timeout=15000)
            assert page.text_content("#total-finished") == "0"
            assert page.text_content("#total-active") == "5"
            rows = page.locator("#cells tr")
            assert rows.count() == 8
            started = sorted(int(rows.nth(i).locator(".count-started").text_content() or "0") for i in range(8))
            assert started == [0, 0, 0, 1, 1, 1, 1, 1]
            assert "first message" in (page.text_content("#funnel") or "")
            assert page.locator("#timeline svg rect").count() >= 1
            assert page.locator("#workers tr").count() >= 1
            # Stays fresh on its own.
            with httpx.Client(base_url=url, timeout=30) as http:
                http.post("api/sessions", json={})
            expect(page.locator("#total-started")).to_have_text("6", timeout=15000)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            cookies = {c["name"]: c for c in page.context.cookies()}
            assert cookies["combot_admin"]["httpOnly"] and cookies["combot_admin"]["sameSite"] == "Strict"
            assert errors == [], errors
            with page.expect_download() as download:
                page.click(".download button")
            assert download.value.suggested_filename == "combot-export.zip"
        finally:
            browser.close()


@pytest.mark.slow
def test_serve_prints_the_admin_address_and_a_new_token_once(live_server: Callable[..., Any], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "COMBOT_ADMIN_TOKEN"}
    first = live_server(workers=1, env=env)
    token_file = Path(str(first.database) + ".admin-token")
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    time.sleep(0.5)
    out = first.output()
    assert f"{first.url}admin" in out and token in out
    assert httpx.get(first.url + "admin/api/stats", headers=bearer(token)).status_code == 200
    assert httpx.get(first.url + "admin/api/stats").status_code == 401
    first.stop()
    second = live_server(workers=1, env=env)
    time.sleep(0.5)
    assert token not in second.output() and str(token_file) in second.output()
    assert httpx.get(second.url + "admin/api/stats", headers=bearer(token)).status_code == 200


def test_a_failed_request_is_recorded_with_the_participant_id_never_the_session_token(
        client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from combot import api

    c = client(environ={"COMBOT_ADMIN_TOKEN": TOKEN})
    session = c.post("/api/sessions", json={}).json()["session_id"]

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the LLM adapter fell over")

    monkeypatch.setattr(api, "bot_messages", broken)
    assert c.post(f"/api/sessions/{session}/messages", json={"text": "My parcel never came."}).status_code == 500
    with sqlite3.connect(tmp_path / "web.db") as conn:
        (pid,) = conn.execute("SELECT id FROM participants").fetchone()
        paths = [row[0] for row in conn.execute("SELECT path FROM events")]
    assert paths == [f"POST /api/sessions/{pid}/messages"]
    assert session not in paths[0]


def test_the_dashboard_says_what_cells_problem_types_and_finishing_mean(
        client: Client, study_file: Callable[..., Path]) -> None:
    c = client(study_file({"email_skip_words = []": 'email_skip_words = ["skip"]'}),
               environ={"COMBOT_ADMIN_TOKEN": TOKEN})
    numbers = c.get("/admin/api/stats", headers=bearer()).json()
    assert numbers["cells"][0]["description"] == "brand: basic · think: high · feel: high"
    assert numbers["cells"][6]["description"] == "brand: bramble · think: low · feel: high"
    meanings = {p["type"]: p["meaning"] for p in numbers["problem_types"]}
    assert meanings["A"] == "defective or poor-quality product" and meanings["Other"].startswith("anything else")
    assert numbers["funnel"][-1]["step"] == "finished (e-mail given or declined)"
    script = (Path(__file__).resolve().parent.parent / "static" / "admin.js").read_text()
    assert "c.description" in script and "p.meaning" in script


def test_the_dashboard_shows_the_study_digest_and_the_closing(client: Client, tmp_path: Path) -> None:
    from combot import store, verify

    c = client(environ={"COMBOT_ADMIN_TOKEN": TOKEN})
    finish(c, c.post("/api/sessions", json={}).json()["session_id"])
    shown = c.get("/admin/api/stats", headers=bearer()).json()["digest"]
    assert shown["digest"] == verify.verify_database(tmp_path / "web.db").digest
    assert shown["participants"] == 1 and shown["messages"] > 2 and shown["closed_at"] is None
    conn = store.connect(tmp_path / "web.db")
    store.close_collection(conn)
    conn.close()
    shown = c.get("/admin/api/stats", headers=bearer()).json()["digest"]
    assert shown["closed_at"] and shown["closing_digest"] == shown["digest"]
    assert 'id="digest"' in c.get("/admin", headers=bearer()).text


def test_a_message_between_two_dashboard_loads_changes_the_digest_shown(client: Client, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard reuses the digest while nothing it covers changed (it is linear in participants
    and reloads every 5 s); it never shows a stale one, and it is the one `combot digest` and
    `combot verify` give."""
    from click.testing import CliRunner

    from combot import verify
    from combot.cli import cli

    computed: list[int] = []
    heads = store.chain_heads
    monkeypatch.setattr(store.digests, "chain_heads", lambda conn: computed.append(1) or heads(conn))
    c = client(environ={"COMBOT_ADMIN_TOKEN": TOKEN})
    session = c.post("/api/sessions", json={}).json()["session_id"]

    def shown() -> dict[str, Any]:
        digest: dict[str, Any] = c.get("/admin/api/stats", headers=bearer()).json()["digest"]
        assert digest["digest"] == verify.verify_database(tmp_path / "web.db").digest
        printed = CliRunner().invoke(cli, ["digest", "--database", str(tmp_path / "web.db")]).output
        assert f"study digest: {digest['digest']}" in printed
        return digest

    first = shown()
    computed.clear()
    assert c.get("/admin/api/stats", headers=bearer()).json()["digest"] == first and computed == []  # reused
    turn = c.post(f"/api/sessions/{session}/messages", json={"text": "The courier lost my parcel."}).json()["turn"]
    second = shown()
    assert second["digest"] != first["digest"] and second["messages"] > first["messages"]
    c.post(f"/api/sessions/{session}/messages", json={"text": "It was left in the rain.", "turn": turn})
    assert shown()["digest"] not in (first["digest"], second["digest"])


@pytest.mark.slow
def test_no_worker_of_the_real_server_shows_a_stale_digest(live_server: Callable[..., Any]) -> None:
    """Each worker process keeps its own last digest; a message answered by one worker changes what
    every worker shows next (new connections, so the kernel spreads the loads over both workers)."""
    from combot import verify

    server = live_server(workers=2, env={"COMBOT_ADMIN_TOKEN": TOKEN})
    with httpx.Client(timeout=30) as http:
        created = http.post(server.url + "api/sessions", json={}).json()
    session, turn = created["session_id"], created["turn"]
    shown: list[str] = []
    for text in ("The courier lost my parcel.", "It was left in the rain.", "Nobody answered my emails."):
        expected = verify.verify_database(server.database).digest
        loads = {httpx.get(server.url + "admin/api/stats", headers=bearer(), timeout=30).json()["digest"]["digest"]
                 for _ in range(8)}
        assert loads == {expected}
        shown.append(expected)
        answer = httpx.post(f"{server.url}api/sessions/{session}/messages", json={"text": text, "turn": turn},
                            timeout=30)
        assert answer.status_code == 200, answer.text
        turn = answer.json()["turn"]
    assert len(set(shown)) == 3


def test_a_storm_of_server_errors_is_recorded_in_few_writes_and_none_is_lost(tmp_path: Path) -> None:
    """When the server is overloaded every request fails; one write per failure would lengthen the
    very queue that is too long. One write is in flight at a time; the rest join the next one."""
    async def storm() -> tuple[int, int]:
        handle = store.Store(tmp_path / "events.db")
        await handle.open()
        writes = 0
        real_run = handle.run

        async def counting_run(fn: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal writes
            writes += 1
            return await real_run(fn, *args, **kwargs)

        handle.run = counting_run  # type: ignore[method-assign]
        errors = monitor.ErrorLog(handle)
        await asyncio.gather(*(errors.add({"at": store.now(), "kind": "error", "pid": 1, "status": 503,
                                           "path": f"POST /api/sessions/{i}", "detail": ""}) for i in range(50)))
        # The first add() writes until nothing is pending, so every event is stored once gather returns.
        stored = await handle.read(lambda conn: conn.execute("SELECT count(*) FROM events").fetchone()[0])
        await handle.close()
        return writes, stored

    writes, stored = asyncio.run(storm())
    assert stored == 50 and writes <= 3
