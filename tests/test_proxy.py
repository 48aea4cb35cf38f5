"""Behind a reverse proxy: forwarded headers are believed from [server] forwarded_allow_ips only."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from starlette.testclient import TestClient

from combot.errors import ConfigError
from combot.study import load_study
from tests.inprocess import Client, client_factory

TOKEN = "proxy-test-token-0123456789"
LIMITED = {"COMBOT_SESSION_RATE_LIMIT": "2", "COMBOT_ADMIN_TOKEN": TOKEN}


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started_app: Callable[..., TestClient]) -> Client:
    return client_factory(tmp_path, monkeypatch, started_app)


def starts(c: TestClient, forwarded_for: str, n: int) -> list[int]:
    return [c.post("/api/sessions", json={}, headers={"X-Forwarded-For": forwarded_for}).status_code
            for _ in range(n)]


def test_from_a_trusted_proxy_the_limit_counts_each_participant_address(client: Client) -> None:
    c = client(environ=LIMITED, peer=("127.0.0.1", 40000))
    # The proxy appends the address it saw last; anything before it was sent by the participant.
    assert starts(c, "203.0.113.5", 3) == [201, 201, 429]
    assert starts(c, "198.51.100.1, 203.0.113.5", 1) == [429]  # a forged first hop changes nothing
    assert starts(c, "203.0.113.6", 2) == [201, 201]
    refused = c.post("/api/sessions", json={}, headers={"X-Forwarded-For": "203.0.113.6"})
    assert refused.status_code == 429 and "wait a minute" in refused.json()["error"]


def test_from_anyone_else_forwarded_headers_are_ignored(client: Client) -> None:
    c = client(environ=LIMITED, peer=("192.0.2.50", 40000))
    # Every X-Forwarded-For differs, yet they all count against the sender's own address.
    assert [c.post("/api/sessions", json={}, headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code
            for n in range(3)] == [201, 201, 429]
    login = c.post("/admin/login", data={"token": TOKEN}, headers={"X-Forwarded-Proto": "https"},
                   follow_redirects=False)
    assert login.status_code == 303 and "secure" not in login.headers["set-cookie"].lower()


def test_the_admin_cookie_is_secure_when_the_proxy_says_https(client: Client) -> None:
    c = client(environ={"COMBOT_ADMIN_TOKEN": TOKEN}, peer=("127.0.0.1", 40000))
    login = c.post("/admin/login", data={"token": TOKEN}, headers={"X-Forwarded-Proto": "https"},
                   follow_redirects=False)
    cookie = login.headers["set-cookie"].lower()
    assert login.status_code == 303 and "; secure" in cookie and "httponly" in cookie


def test_networks_and_any(client: Client) -> None:
    c = client(environ={**LIMITED, "COMBOT_FORWARDED_ALLOW_IPS": "10.0.0.0/8"}, peer=("10.1.2.3", 40000))
    assert starts(c, "203.0.113.7", 2) + starts(c, "203.0.113.8", 1) == [201, 201, 201]


def test_no_limit_by_default(client: Client) -> None:
    c = client(peer=("127.0.0.1", 40000))
    assert set(starts(c, "203.0.113.9", 25)) == {201}


def test_a_bad_address_names_the_line(study_file: Callable[..., Path]) -> None:
    path = study_file(replace={"[server]\n": '[server]\nforwarded_allow_ips = ["127.0.0.1", "my-proxy"]\n'})
    with pytest.raises(ConfigError) as error:
        load_study(path, environ={})
    line = path.read_text().splitlines().index('forwarded_allow_ips = ["127.0.0.1", "my-proxy"]') + 1
    assert "forwarded_allow_ips" in str(error.value) and "'my-proxy'" in str(error.value)
    assert f"line {line}:" in str(error.value)


def test_the_sign_in_page_links_relative_to_where_it_is(client: Client) -> None:
    c = client(environ={"COMBOT_ADMIN_TOKEN": TOKEN})
    at_admin, at_login = c.get("/admin").text, c.get("/admin/login").text
    assert 'href="static/admin.css"' in at_admin and 'action="admin/login"' in at_admin
    assert 'href="../static/admin.css"' in at_login and 'action="../admin/login"' in at_login
    for page in (at_admin, at_login, c.get("/").text):
        assert 'href="/' not in page and 'src="/' not in page and 'action="/' not in page
    wrong = c.post("/admin/login", data={"token": "nope"})
    assert wrong.status_code == 401 and 'action="../admin/login"' in wrong.text
