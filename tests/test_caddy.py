"""Combot behind a real reverse proxy: Debian's Caddy with `tls internal` in front of the real
multi-worker server, and Chromium through it, at the host's root and under a sub-path (/study1/).

Caddy runs on loopback only, with its admin endpoint off and its certificates, autosave and home in
the test's temporary folder; nothing is installed into a trust store (httpx trusts Caddy's local
root explicitly, Chromium is told to ignore the unknown issuer).
"""

from __future__ import annotations

import io
import os
import re
import socket
import sqlite3
import ssl
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from tests.conftest import LiveServer, free_port
from tests.test_page import browser, sync_api, transcript, walk_to_the_end  # noqa: F401  (browser is a fixture)

pytestmark = pytest.mark.slow

CADDY = "/usr/bin/caddy"
TOKEN = "caddy-test-researcher-token-0123456789"
STARTUP_SECONDS = 30


@dataclass
class Caddy:
    process: subprocess.Popen[bytes]
    home: Path
    log: Path
    ports: list[int]

    @property
    def root_ca(self) -> Path:
        return self.home / "data" / "pki" / "authorities" / "local" / "root.crt"

    def trust(self) -> ssl.SSLContext:
        """A TLS context that trusts Caddy's local root and nothing else."""
        return ssl.create_default_context(cafile=str(self.root_ca))

    def url(self, site: int = 0, path: str = "/") -> str:
        return f"https://127.0.0.1:{self.ports[site]}{path}"


def caddy_version() -> str:
    return subprocess.run([CADDY, "version"], capture_output=True, text=True, timeout=10).stdout.strip()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def caddy(tmp_path: Path) -> Iterator[Callable[..., Caddy]]:
    """caddy(upstream_port, sites=[site blocks with {port} and {upstream}]) -> a running Caddy."""
    if not Path(CADDY).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CADDY} is missing and CI is set: install Debian's caddy package")
        pytest.skip(f"{CADDY} is missing (apt-get install caddy)")
    started: list[Caddy] = []

    def start(upstream: int, sites: list[str]) -> Caddy:
        home = tmp_path / "caddy"
        home.mkdir()
        ports = [free_port() for _ in sites]
        blocks = "\n".join(site.format(port=port, upstream=upstream) for site, port in zip(sites, ports))
        config = home / "Caddyfile"
        config.write_text(f"""{{
\tadmin off
\tskip_install_trust
\tlocal_certs
\tauto_https disable_redirects
\thttp_port {free_port()}
\thttps_port {ports[0]}
\tstorage file_system {home / "data"}
\tservers {{
\t\tprotocols h1 h2
\t}}
}}
{blocks}
""")
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                       "XDG_DATA_HOME": str(home / "xdg-data"), "XDG_CONFIG_HOME": str(home / "xdg-config")}
        log = home / "caddy.log"
        with log.open("wb") as out:
            process = subprocess.Popen([CADDY, "run", "--config", str(config), "--adapter", "caddyfile"],
                                       stdout=out, stderr=subprocess.STDOUT, env=environment, cwd=home)
        proxy = Caddy(process, home, log, ports)
        started.append(proxy)
        deadline = time.monotonic() + STARTUP_SECONDS
        while not (proxy.root_ca.exists() and all(_listening(port) for port in ports)):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"caddy did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        # The first certificate is issued just after the listener opens: wait until a handshake works.
        while True:
            try:
                httpx.get(proxy.url(), verify=proxy.trust(), timeout=5)
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"caddy serves no TLS:\n{log.read_text(errors='replace')}") from None
                time.sleep(0.1)
        return proxy

    yield start
    for proxy in started:
        proxy.process.terminate()
        try:
            proxy.process.wait(10)
        except subprocess.TimeoutExpired:
            proxy.process.kill()
            proxy.process.wait(10)


WHOLE_HOST = """https://127.0.0.1:{port} {{
\tbind 127.0.0.1
\ttls internal
\treverse_proxy 127.0.0.1:{upstream}
}}"""

SUB_PATH = """https://127.0.0.1:{port} {{
\tbind 127.0.0.1
\ttls internal
\tredir /study1 /study1/
\thandle_path /study1/* {{
\t\treverse_proxy 127.0.0.1:{upstream}
\t}}
\thandle {{
\t\trespond "outside the study" 404
\t}}
}}"""


def upstream_port(server: LiveServer) -> int:
    return int(server.url.rsplit(":", 1)[1].strip("/"))


class Visit:
    """A Chromium context through the proxy that records every response, to find any that failed."""

    def __init__(self, browser: Any, base: str):
        self.base = base
        self.context = browser.new_context(ignore_https_errors=True, service_workers="block")
        self.responses: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self.context.on("response", lambda r: self.responses.append((r.status, r.url)))

    def page(self, path: str) -> Any:
        page = self.context.new_page()
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.goto(self.base + path)
        return page

    def failed(self) -> list[tuple[int, str]]:
        # The sign-in form is served with 401 on purpose.
        return [(s, u) for s, u in self.responses if s >= 400 and not (s == 401 and u.endswith("/admin"))]


def chat_to_the_end(visit: Visit, database: Path) -> dict[str, Any]:
    page = visit.page("?PROLIFIC_PID=caddy-" + str(time.monotonic_ns()))
    page.wait_for_selector(".msg--bot .bubble__text")
    sync_api.expect(page.locator("#bot-logo-wrap")).to_be_visible()
    logo = page.locator("#bot-logo").evaluate("img => img.decode().then(() => [img.src, img.naturalWidth])")
    walk_to_the_end(page)
    shown = transcript(page)
    with sqlite3.connect(database) as conn:
        status, stored = conn.execute("SELECT status, (SELECT count(*) FROM messages m WHERE m.participant_id = p.id)"
                                      " FROM participants p ORDER BY created_at DESC LIMIT 1").fetchone()
    page.close()
    return {"logo": logo, "shown": len(shown), "status": status, "stored": stored}


def sign_in(visit: Visit) -> dict[str, Any]:
    page = visit.page("admin")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    # A locator, not wait_for_function: the dashboard's CSP forbids the eval that polling would need.
    sync_api.expect(page.locator("#total-started")).to_have_text(re.compile(r"^[0-9]+$"))
    started = int(page.locator("#total-started").inner_text())
    cookie = next(c for c in visit.context.cookies() if c["name"] == "combot_admin")
    exported = visit.context.request.get(visit.base + "admin/export.zip?anonymise=1")
    names = zipfile.ZipFile(io.BytesIO(exported.body())).namelist() if exported.ok else []
    page.close()
    return {"started": started, "cookie": cookie, "export_status": exported.status, "export": names}


def test_tls_internal_in_front_the_chat_the_admin_cookie_and_the_participant_address(
        live_server: Callable[..., LiveServer], caddy: Callable[..., Caddy], browser: Any) -> None:
    server = live_server(workers=2, env={**os.environ, "COMBOT_ADMIN_TOKEN": TOKEN, "COMBOT_SESSION_RATE_LIMIT": "3"})
    proxy = caddy(upstream_port(server), [WHOLE_HOST])
    print(f"\n[caddy] {caddy_version()}; Chromium {browser.version}")

    # TLS with a certificate chain that verifies against Caddy's own local root.
    health = httpx.get(proxy.url(path="/healthz"), verify=proxy.trust(), timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"

    visit = Visit(browser, proxy.url())
    chat = chat_to_the_end(visit, server.database)
    assert chat["status"] == "finished" and chat["stored"] == chat["shown"]
    assert chat["logo"][0].startswith(proxy.url(path="/assets/")) and chat["logo"][1] > 0
    admin = sign_in(visit)
    assert admin["started"] >= 1
    cookie = admin["cookie"]
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"
    assert admin["export_status"] == 200 and "participants.csv" in admin["export"]
    assert visit.failed() == [] and visit.errors == []
    print(f"[caddy] chat: {chat}; admin cookie: secure={cookie['secure']} path={cookie['path']}")

    # The limit of 3 new sessions a minute counts the participant's address, which Caddy forwards,
    # not Caddy's own 127.0.0.1: one address runs out (each of the 2 workers keeps its own count,
    # and a forged X-Forwarded-For changes nothing), while another address still starts at once.
    def from_address(address: str) -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=address, verify=proxy.trust())
        return httpx.Client(transport=transport, timeout=10)

    with from_address("127.0.0.2") as one, from_address("127.0.0.3") as other:
        codes = []
        while 429 not in codes and len(codes) < 12:
            codes.append(one.post(proxy.url(path="/api/sessions"), json={},
                                  headers={"X-Forwarded-For": f"198.51.100.{len(codes)}"}).status_code)
        assert codes[-1] == 429 and 3 <= codes.count(201) <= 6, codes
        assert other.post(proxy.url(path="/api/sessions"), json={}).status_code == 201
    print(f"[caddy] from 127.0.0.2: {codes}; from 127.0.0.3: 201")


def test_under_a_sub_path_page_logos_api_admin_and_export(
        live_server: Callable[..., LiveServer], caddy: Callable[..., Caddy], browser: Any) -> None:
    server = live_server(workers=2, env={**os.environ, "COMBOT_ADMIN_TOKEN": TOKEN})
    proxy = caddy(upstream_port(server), [SUB_PATH])
    base = proxy.url(path="/study1/")
    # Outside /study1/ nothing is Combot's: a URL that escaped the sub-path would fail below.
    assert httpx.get(proxy.url(path="/healthz"), verify=proxy.trust()).status_code == 404
    assert httpx.get(proxy.url(path="/study1"), verify=proxy.trust()).headers["location"] == "/study1/"

    visit = Visit(browser, base)
    chat = chat_to_the_end(visit, server.database)
    assert chat["status"] == "finished" and chat["stored"] == chat["shown"]
    assert chat["logo"][0].startswith(base + "assets/") and chat["logo"][1] > 0
    admin = sign_in(visit)
    assert admin["started"] == 1
    assert admin["cookie"]["path"] == "/study1/admin" and admin["cookie"]["secure"]
    assert admin["export_status"] == 200 and "participants.csv" in admin["export"]
    assert visit.failed() == [] and visit.errors == []
    assert all(url.startswith(base) for _, url in visit.responses), [u for _, u in visit.responses]
    print(f"\n[caddy sub-path] {len(visit.responses)} responses, all under {base}; chat: {chat}")
