"""The participant page in a real browser: Debian's headless Chromium driven by Playwright, against
the real server started in a subprocess. Checks what a participant sees against what is on disk."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

pytestmark = pytest.mark.slow

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PHONE = {"width": 390, "height": 844}
SCREENSHOT = Path("/tmp/combot-page.png")
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
FIRST = "I ordered a kettle online and it stopped working after two days; the handle also melted."
EMAIL = "participant@example.com"


def _require_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing and CI is set: install Debian's chromium package")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); the page tests need Debian's Chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _require_chromium()
    with sync_api.sync_playwright() as playwright:
        # Never a downloaded browser: the system's Chromium, with everything that phones home turned off.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Phone:
    """A phone-sized browser context that only talks to the study server and records page errors."""

    def __init__(self, browser: Any, base: str):
        self.base = base
        self.context = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True,
                                           service_workers="block")
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.context.route("**/*", self._only_the_server)

    def _only_the_server(self, route: Any) -> None:
        # The page must work offline: no CDN, no web fonts, nothing but the study server.
        if route.request.url.startswith(self.base):
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort()

    def open(self, path: str = "", wait_for: str = ".msg--bot .bubble__text") -> Any:
        page = self.context.new_page()
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        page.goto(self.base + path)
        page.wait_for_selector(wait_for)
        return page

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def phone(browser: Any) -> Iterator[Callable[[str], Phone]]:
    made: list[Phone] = []

    def make(base: str) -> Phone:
        made.append(Phone(browser, base))
        return made[-1]

    yield make
    for one in made:
        one.close()


# --- what the page shows ------------------------------------------------------------------------

def transcript(page: Any) -> list[tuple[str, str]]:
    """(sender, text) for every message in the page's log, as the participant sees it."""
    return [tuple(row) for row in page.eval_on_selector_all(
        ".log .msg",
        "rows => rows.map(r => [r.classList.contains('msg--participant') ? 'participant' : 'bot',"
        " r.querySelector('.bubble__text').textContent])")]


def expects(page: Any) -> str:
    if page.locator("#composer").is_hidden():
        return "done"
    return "email" if page.locator("#email").is_visible() else "message"


def send(page: Any, text: str) -> list[str]:
    """Type `text` into whichever field is showing and press Enter; returns the bot's new replies."""
    before = page.locator(".msg--bot").count()
    field = page.locator("#email" if expects(page) == "email" else "#message")
    field.fill(text)
    field.press("Enter")
    page.wait_for_function(
        "n => document.querySelectorAll('.msg--bot').length > n && document.getElementById('typing').hidden",
        arg=before)
    return [text for sender, text in transcript(page) if sender == "bot"][before:]


def walk_to_the_end(page: Any) -> None:
    send(page, FIRST)
    answers = iter(["It was last week.", "Nobody helped.", "No refund.", "I was angry.", "Never again."])
    while expects(page) == "message":
        send(page, next(answers))
    send(page, EMAIL)
    assert expects(page) == "done"


def focused_id(page: Any) -> str:
    return str(page.evaluate("document.activeElement && document.activeElement.id"))


# --- what is on disk ----------------------------------------------------------------------------

def read_db(database: Path) -> dict[str, Any]:
    conn = sqlite3.connect(database)
    conn.row_factory = sqlite3.Row
    try:
        participants = [dict(r) for r in conn.execute("SELECT * FROM participants ORDER BY created_at")]
        messages = [dict(r) for r in conn.execute("SELECT * FROM messages ORDER BY id")]
        emails = [dict(r) for r in conn.execute("SELECT * FROM emails")]
    finally:
        conn.close()
    return {"participants": participants, "messages": messages, "emails": emails}


# --- tests --------------------------------------------------------------------------------------

def test_whole_study_on_a_phone_and_every_message_is_on_disk(live_server: Callable[..., Any],
                                                              phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    page = browser.open()

    log = page.locator("#log")
    assert log.get_attribute("role") == "log" and log.get_attribute("aria-live") == "polite"
    assert page.locator("#bot-name").inner_text().strip() not in ("", "Chat")
    assert page.locator("label[for=message]").count() == 1
    assert focused_id(page) == "message"
    greeting = transcript(page)
    assert len(greeting) == 1 and greeting[0][0] == "bot" and greeting[0][1]

    in_flight: list[dict[str, Any]] = []

    def look_while_waiting(route: Any) -> None:
        in_flight.append(page.evaluate("""() => ({
            sendDisabled: document.getElementById('send').disabled,
            typing: !document.getElementById('typing').hidden,
            status: document.getElementById('status').textContent,
            shown: [...document.querySelectorAll('.msg--participant .bubble__text')].map(e => e.textContent)})"""))
        route.continue_()

    page.route("**/api/sessions/*/messages", look_while_waiting)
    replies = send(page, FIRST)
    page.unroute("**/api/sessions/*/messages")
    assert replies, "no follow-up after the first message"
    # While the reply is on its way: the message is already shown, the send button is off, the bot "types".
    assert in_flight and in_flight[0]["sendDisabled"] and in_flight[0]["typing"]
    assert "is typing" in in_flight[0]["status"] and in_flight[0]["shown"] == [FIRST]
    assert not page.locator("#send").is_disabled()
    assert focused_id(page) == "message", "focus should return to the input after a reply"

    # Shift+Enter makes a new line, Enter sends.
    page.locator("#message").click()
    page.keyboard.type("It was a birthday present.")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("Nobody answered my e-mails.")
    before = page.locator(".msg--bot").count()
    page.keyboard.press("Enter")
    page.wait_for_function("n => document.querySelectorAll('.msg--bot').length > n", arg=before)
    assert ("participant", "It was a birthday present.\nNobody answered my e-mails.") in transcript(page)

    page.wait_for_timeout(200)  # let the last bubble settle before the picture
    page.screenshot(path=str(SCREENSHOT))

    answers = iter(["The seller said it must have been my fault.", "They offered nothing at all.",
                    "I was without a kettle for two weeks.", "I will not buy from them again."])
    turns = 0
    while expects(page) == "message":
        send(page, next(answers))
        turns += 1
        assert turns < 4, "the conversation never asked for an e-mail address"
    assert expects(page) == "email"
    email_field = page.locator("#email")
    assert email_field.get_attribute("type") == "email" and email_field.get_attribute("inputmode") == "email"
    assert email_field.get_attribute("placeholder")

    re_ask = send(page, "not-an-email")
    assert len(re_ask) == 1 and "e-mail" in re_ask[0]
    assert expects(page) == "email", "an invalid address must not end the conversation"

    send(page, EMAIL)
    assert expects(page) == "done"
    link = page.locator("#log a.survey-link")
    assert link.count() == 1
    href = link.get_attribute("href") or ""
    assert href.startswith("https://example.qualtrics.com/"), href
    assert link.get_attribute("rel") == "noopener"
    assert link.inner_text().strip()
    assert EMAIL not in href

    shown = transcript(page)
    data = read_db(server.database)
    assert len(data["participants"]) == 1
    participant = data["participants"][0]
    assert participant["status"] == "finished"
    assert f"pid={participant['id']}" in href
    stored = [(m["sender"], m["text"]) for m in data["messages"]]
    # The address itself is kept apart from the transcript, in the e-mails table.
    assert shown[-2] == ("participant", EMAIL)
    assert stored[-2] == ("participant", "[e-mail address]")
    assert [(e["participant_id"], e["email"]) for e in data["emails"]] == [(participant["id"], EMAIL)]
    # What was typed at the e-mail step is personal data even when it is not an address: stored as a marker.
    typed_at_email = {("participant", "not-an-email"): ("participant", "[not an e-mail address]")}
    assert stored[:-2] + stored[-1:] == [typed_at_email.get(m, m) for m in shown[:-2] + shown[-1:]]
    assert not browser.errors and not browser.outside


def test_refresh_resumes_the_same_conversation(live_server: Callable[..., Any], phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    page = browser.open()
    send(page, FIRST)
    send(page, "It happened last week.")
    before = transcript(page)
    assert len(before) == 5

    page.reload()
    page.wait_for_selector(".msg--bot .bubble__text")
    assert transcript(page) == before
    assert len(read_db(server.database)["participants"]) == 1

    # A closed tab resumes too (the id is in localStorage), and the conversation carries on.
    page.close()
    page = browser.open()
    assert transcript(page) == before
    send(page, "They never called me back.")
    data = read_db(server.database)
    assert len(data["participants"]) == 1
    assert [(m["sender"], m["text"]) for m in data["messages"]] == transcript(page)
    assert not browser.errors and not browser.outside


def test_hostile_text_is_shown_as_text(live_server: Callable[..., Any], phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    page = browser.open()
    send(page, HOSTILE)
    page.wait_for_timeout(300)  # give an injected onerror handler time to fire, if there were one
    assert ("participant", HOSTILE) in transcript(page)
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("#log img[src=x], #log script").count() == 0
    # And a second line of defence: the page's policy allows only its own script files.
    policy = page.locator('meta[http-equiv="Content-Security-Policy"]').get_attribute("content") or ""
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy

    page.reload()  # the same text rendered again from the server's transcript
    page.wait_for_selector(".msg--participant")
    page.wait_for_timeout(300)
    assert ("participant", HOSTILE) in transcript(page)
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("#log img[src=x], #log script").count() == 0
    assert not browser.outside


def test_query_string_is_forwarded(live_server: Callable[..., Any], phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    browser.open("?PROLIFIC_PID=abc123&STUDY_ID=s1")
    participants = read_db(server.database)["participants"]
    assert len(participants) == 1
    params = json.loads(participants[0]["url_params"])
    assert params["PROLIFIC_PID"] == "abc123" and params["STUDY_ID"] == "s1"
    assert not browser.errors and not browser.outside


def test_a_lost_request_is_retried_with_the_same_message_id(live_server: Callable[..., Any],
                                                           phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    page = browser.open()
    seen: list[str] = []

    def flaky(route: Any) -> None:
        seen.append(json.loads(route.request.post_data or "{}")["client_message_id"])
        if len(seen) == 1:
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route("**/api/sessions/*/messages", flaky)
    assert send(page, FIRST)
    assert len(seen) == 2 and seen[0] == seen[1]
    assert page.locator(".msg--failed").count() == 0
    participant_messages = [m for m in read_db(server.database)["messages"] if m["sender"] == "participant"]
    assert [(m["text"], m["client_message_id"]) for m in participant_messages] == [(FIRST, seen[0])]


def test_a_message_that_cannot_be_sent_is_marked_and_can_be_retried(live_server: Callable[..., Any],
                                                                   phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    page = browser.open()
    seen: list[str] = []

    def down(route: Any) -> None:
        seen.append(json.loads(route.request.post_data or "{}")["client_message_id"])
        route.fulfill(status=503, json={"error": "the server is busy storing messages; please try again in a moment"})

    page.route("**/api/sessions/*/messages", down)
    page.locator("#message").fill(FIRST)
    page.locator("#message").press("Enter")
    page.wait_for_selector(".msg--failed", timeout=30_000)
    assert len(seen) >= 3 and len(set(seen)) == 1, seen
    # Marked where it is, with its own button; Send waits until it has gone.
    failed = page.locator(".msg--failed")
    assert "Not sent" in failed.inner_text()
    assert page.locator("#send").is_disabled()
    assert page.locator("#typing").is_hidden()

    page.unroute("**/api/sessions/*/messages")
    failed.locator("button.msg__retry").click()
    page.wait_for_function("() => document.querySelectorAll('.msg--bot').length > 1")
    assert page.locator(".msg--failed").count() == 0
    assert [m["client_message_id"] for m in read_db(server.database)["messages"] if m["sender"] == "participant"] == seen[:1]


def test_a_refused_message_keeps_what_was_typed(live_server: Callable[..., Any], phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    page = browser.open()
    page.route("**/api/sessions/*/messages", lambda route: route.fulfill(
        status=429, json={"error": "you are sending messages too quickly; please wait a moment"}))
    page.locator("#message").fill(FIRST)
    page.locator("#message").press("Enter")
    page.wait_for_selector("#notice:not([hidden])")
    assert "sending messages too quickly" in page.locator("#notice-text").inner_text()
    assert page.locator("#message").input_value() == FIRST
    assert page.locator(".msg--participant").count() == 0
    assert not page.locator("#send").is_disabled()

    # The over-long message: the counter says so and the page does not send it.
    page.unroute("**/api/sessions/*/messages")
    page.locator("#message").fill("x" * 2001)
    assert "2001 / 2000" in page.locator("#counter").inner_text()
    assert page.locator("#send").is_disabled()
    assert read_db(server.database)["messages"][-1]["sender"] == "bot"


def test_a_conversation_finished_elsewhere_reloads_on_conflict(live_server: Callable[..., Any],
                                                              phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    page = browser.open()
    token = page.evaluate("Object.entries(localStorage).find(([k]) => k.startsWith('combot:session:'))[1]")
    # Another tab (here: a plain HTTP client) finishes the conversation while this page still shows the input.
    with httpx.Client(base_url=server.url, timeout=30) as client:
        expected = "message"
        answers = iter([FIRST, "one", "two", "three", "four", "five", EMAIL])
        while expected != "done":
            reply = client.post(f"api/sessions/{token}/messages", json={"text": next(answers)})
            assert reply.status_code == 200, reply.text
            expected = reply.json()["expects"]
    page.locator("#message").fill("Is anyone there?")
    page.locator("#message").press("Enter")
    page.wait_for_selector("#log a.survey-link")
    assert expects(page) == "done"
    assert ("participant", "Is anyone there?") not in transcript(page)
    stored = [(m["sender"], m["text"]) for m in read_db(server.database)["messages"]]
    assert transcript(page) == stored
    assert not browser.outside


def test_consent_comes_first_when_the_study_asks_for_it(live_server: Callable[..., Any],
                                                        phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1, env={**os.environ, "COMBOT_CONSENT": "true"})
    browser = phone(server.url)
    page = browser.open("?PROLIFIC_PID=agrees", wait_for="#consent:not([hidden])")
    assert page.locator("#consent h2").inner_text().strip()
    assert page.locator("#consent-text p").count() >= 1
    assert page.locator("#composer").is_hidden()
    assert read_db(server.database)["participants"] == [], "showing the consent page must not start a session"

    page.locator("#consent-agree").click()
    page.wait_for_selector(".msg--bot .bubble__text")
    assert page.locator("#consent").is_hidden()
    assert focused_id(page) == "message"
    send(page, FIRST)
    page.reload()  # the session is stored: no second consent page
    page.wait_for_selector(".msg--participant")
    assert page.locator("#consent").is_hidden()

    other = browser.open("?PROLIFIC_PID=declines", wait_for="#consent:not([hidden])")
    other.locator("#consent-decline").click()
    other.wait_for_selector("#declined:not([hidden])")
    assert other.locator("#declined").inner_text().strip()
    assert other.locator("#composer").is_hidden() and other.locator("#log .msg").count() == 0
    statuses = sorted((json.loads(p["url_params"])["PROLIFIC_PID"], p["status"])
                      for p in read_db(server.database)["participants"])
    assert statuses == [("agrees", "started"), ("declines", "declined")]
    assert not browser.outside


def test_completion_redirect_without_a_survey(live_server: Callable[..., Any], phone: Callable[[str], Phone],
                                             study_file: Callable[..., Path]) -> None:
    config = study_file(replace={
        'url = "https://example.qualtrics.com/jfe/form/SV_0000000000?pid={participant_id}"':
            'url = ""\ncompletion_url = "https://app.prolific.com/submissions/complete?cc=C0DE"'})
    server = live_server(workers=1, config=config)
    browser = phone(server.url)
    page = browser.open("?PROLIFIC_PID=abc123")
    page.route("https://app.prolific.com/**", lambda route: route.fulfill(
        status=200, content_type="text/html", body="<title>Prolific</title>done"))
    walk_to_the_end(page)
    assert page.locator("#log a").count() == 0, "no survey configured: the thank-you has no link"
    handoff = page.locator("#handoff a")
    assert handoff.get_attribute("href") == "https://app.prolific.com/submissions/complete?cc=C0DE"
    assert "automatically" in page.locator("#handoff-text").inner_text()
    page.wait_for_url("https://app.prolific.com/submissions/complete?cc=C0DE", timeout=15_000)


# Records, in the page, each bot bubble added and each change of the typing indicator, in order, with
# the page's clock: what the participant saw and when, whatever the test's own polling misses.
WATCH = """() => {
  window.__seen = [];
  const typing = document.getElementById('typing');
  new MutationObserver(records => {
    for (const r of records) {
      if (r.type === 'attributes') {
        if (r.target === typing) window.__seen.push([typing.hidden ? 'typing off' : 'typing on', performance.now()]);
        continue;
      }
      for (const node of r.addedNodes) {
        if (node.classList && node.classList.contains('msg')) {
          window.__seen.push([node.classList.contains('msg--bot') ? 'bot' : 'participant', performance.now()]);
        }
      }
    }
  }).observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ['hidden']});
}"""


def test_replies_of_one_turn_come_one_after_another_in_one_group(
        live_server: Callable[..., Any], phone: Callable[[str], Phone], study_file: Callable[..., Path]) -> None:
    # The first message ends the chat (no follow-ups): the empathy statement, then the closing question,
    # each a fixed 1.5 s (typing mode without jitter, min = max).
    config = study_file(replace={"followup_turns = 4": "followup_turns = 0",
                                 'when = { feel = "low" }\ntext = ""': 'when = { feel = "low" }\ntext = "I see."'},
                        append='\n[[timing]]\nmode = "typing"\njitter = 0\nmin = 1.5\nmax = 1.5\n')
    server = live_server(workers=1, config=config)
    page = phone(server.url).open()
    page.evaluate(WATCH)
    page.locator("#message").fill(FIRST)
    page.locator("#message").press("Enter")
    page.wait_for_function(
        "() => document.querySelectorAll('.msg--bot').length === 3 && document.getElementById('typing').hidden")
    seen = page.evaluate("() => window.__seen")
    events = [name for name, _ in seen]
    # Typing while the server holds the answer, the first reply, typing again, the second.
    assert events[0] == "participant"
    assert events[events.index("bot"):] == ["bot", "typing on", "typing off", "bot"], events
    at = {name: [t for n, t in seen if n == name] for name in ("participant", "bot")}
    assert at["bot"][0] - at["participant"][0] >= 1450  # held by the server until due (lower bounds only)
    assert at["bot"][1] - at["bot"][0] >= 1450  # paced by the page at the reply's delay_ms
    rows = page.locator(".log .msg--bot")
    assert "msg--group-next" in rows.nth(1).get_attribute("class")
    assert "msg--group-prev" in rows.nth(2).get_attribute("class")
    assert not rows.nth(1).locator(".avatar").is_visible() and rows.nth(2).locator(".avatar").is_visible()
    assert expects(page) == "email"


def test_a_closed_study_says_so_and_a_started_conversation_keeps_what_was_typed(
        live_server: Callable[..., Any], phone: Callable[[str], Phone]) -> None:
    """After `combot digest --close`: a new visitor reads that collection has ended (no retries, no
    consent page); a participant mid-conversation keeps the transcript and the unsent text."""
    import subprocess
    import sys

    server = live_server(workers=1)
    started = phone(server.url)
    page = started.open()
    closed = subprocess.run([sys.executable, "-m", "combot", "digest", "--close", "--yes", "--database",
                             str(server.database)], capture_output=True, text=True, timeout=60)
    assert closed.returncode == 0, closed.stdout + closed.stderr
    page.locator("#message").fill(FIRST)
    page.locator("#message").press("Enter")
    page.wait_for_selector("#notice:not([hidden])")
    assert "finished collecting data" in page.locator("#notice-text").inner_text()
    assert page.locator("#message").input_value() == FIRST
    assert page.locator(".msg--participant").count() == 0
    newcomer = phone(server.url).open(wait_for="#notice:not([hidden])")
    assert "finished collecting data" in newcomer.locator("#notice-text").inner_text()
    assert newcomer.locator("#notice-action").is_hidden() and newcomer.locator(".msg").count() == 0
    assert not started.errors or all("410" in error for error in started.errors), started.errors
