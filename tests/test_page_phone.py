"""The chat page on a phone (issue 18), in Debian's Chromium through Playwright at 390 x 844 with touch, against
the real server: offline and back, the newest message in view (reloads, the on-screen keyboard, reading back),
drafts across reloads, text typed in a tab whose conversation ended elsewhere, right-to-left scripts."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from tests.test_page import EMAIL, FIRST, PHONE, Phone, browser, expects, phone, send, transcript  # noqa: F401

pytestmark = pytest.mark.slow

ANSWERS = ["It was last week, on a Tuesday, and I had waited for it for a long time because it was a present.",
           "Nobody helped me when I called them, twice, and the second time they simply hung up on me."]

# How far the newest message reaches below what the participant can see: the scroller's bottom edge (the
# composer starts there) or the visual viewport's, whichever is higher. 0 when it is all in view.
HIDDEN_PX = """() => {
  const rows = document.querySelectorAll('#log .msg');
  const last = rows[rows.length - 1].getBoundingClientRect();
  const scroller = document.getElementById('scroller').getBoundingClientRect();
  const vv = window.visualViewport;
  const bottom = Math.min(scroller.bottom, vv ? vv.offsetTop + vv.height : window.innerHeight);
  return Math.max(0, Math.round(last.bottom - bottom));
}"""

# Counts every time the typing indicator is shown, from now on.
WATCH_TYPING = """() => {
  window.__typingShown = 0;
  const typing = document.getElementById('typing');
  new MutationObserver(() => { if (!typing.hidden) window.__typingShown += 1; })
    .observe(typing, {attributes: true, attributeFilter: ['hidden']});
}"""


def participant_rows(database: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(database)
    try:
        return list(conn.execute(
            "SELECT text, client_message_id FROM messages WHERE sender = 'participant' ORDER BY id"))
    finally:
        conn.close()


def message_ids(page: Any) -> list[str]:
    """Records the client_message_id of every message request that really leaves the page."""
    ids: list[str] = []

    def seen(request: Any) -> None:
        if request.method == "POST" and request.url.endswith("/messages"):
            ids.append(json.loads(request.post_data or "{}")["client_message_id"])

    page.on("request", seen)
    return ids


def long_conversation(page: Any) -> None:
    send(page, FIRST)
    for text in ANSWERS:
        send(page, text)


# --- offline and back -----------------------------------------------------------------------------

def test_offline_message_waits_in_place_and_is_sent_once_when_back_online(
        live_server: Callable[..., Any], phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    page = browser.open()
    ids = message_ids(page)
    page.evaluate(WATCH_TYPING)

    browser.context.set_offline(True)
    page.locator("#message").fill(FIRST)
    page.locator("#message").press("Enter")
    row = page.locator(".msg--participant.msg--failed")
    row.wait_for()
    # Nothing is in flight, so nothing "is typing"; the message is where it was sent, marked, with its own button.
    assert page.evaluate("window.__typingShown") == 0
    assert page.locator("#typing").is_hidden()
    assert "Not sent" in row.inner_text() and "offline" in row.inner_text()
    # Said inside the live log region, where screen readers hear additions, like the messages themselves.
    assert row.locator(".msg__state").evaluate("e => e.closest('[role=log][aria-live=polite]') !== null")
    retry = row.locator("button.msg__retry")
    assert retry.is_visible() and retry.is_enabled()
    assert page.locator("#notice").is_hidden(), "no notice pushes the message out of view"
    box = row.bounding_box()
    dock = page.locator(".dock").bounding_box()
    assert box is not None and dock is not None and box["y"] + box["height"] <= dock["y"] + 1
    assert page.evaluate(HIDDEN_PX) == 0
    assert page.locator("#send").is_disabled(), "a second message may not overtake the unsent one"

    browser.context.set_offline(False)  # fires `online`: the page sends it by itself
    page.wait_for_function("() => document.querySelectorAll('.msg--bot').length > 1")
    assert page.locator(".msg--failed").count() == 0
    assert page.locator("#typing").is_hidden()
    assert len(ids) == 1 and len(set(ids)) == 1
    assert participant_rows(server.database) == [(FIRST, ids[0])]

    # Offline again mid-conversation, and the participant taps "Send again" while still offline: it stays put.
    browser.context.set_offline(True)
    page.locator("#message").fill(ANSWERS[0])
    page.locator("#message").press("Enter")
    page.locator(".msg--failed").wait_for()
    page.locator(".msg--failed button.msg__retry").click()
    page.locator(".msg--failed button.msg__retry").wait_for()
    browser.context.set_offline(False)
    page.wait_for_function("() => document.querySelectorAll('.msg--bot').length > 2")
    stored = participant_rows(server.database)
    assert [text for text, _ in stored] == [FIRST, ANSWERS[0]]
    assert len(set(ids)) == 2 and [cid for _, cid in stored] == list(dict.fromkeys(ids))
    assert not [e for e in browser.errors if not e.startswith("Failed to load resource")]


def test_a_message_whose_answer_was_lost_goes_again_after_a_reload_and_is_stored_once(
        live_server: Callable[..., Any], phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    page = browser.open()
    ids = message_ids(page)

    # The server stores the message, but every answer is lost on the way back: the page gives up, marked.
    def lost(route: Any) -> None:
        route.fetch()
        route.abort("connectionreset")

    page.route("**/api/sessions/*/messages", lost)
    page.locator("#message").fill(FIRST)
    page.locator("#message").press("Enter")
    page.locator(".msg--failed").wait_for(timeout=60_000)
    assert len(participant_rows(server.database)) == 1
    page.unroute("**/api/sessions/*/messages")

    # The participant reloads instead of pressing "Send again": the transcript has it, so it is not sent again.
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('#log .msg--participant').length === 1")
    assert page.locator(".msg--failed").count() == 0
    first_ids = set(ids)
    assert len(first_ids) == 1

    # Never stored (the request never left): after a reload it goes again, with its id, and is stored once.
    page.route("**/api/sessions/*/messages", lambda route: route.abort("connectionreset"))
    page.locator("#message").fill(ANSWERS[0])
    page.locator("#message").press("Enter")
    page.locator(".msg--failed").wait_for(timeout=60_000)
    page.unroute("**/api/sessions/*/messages")
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('.msg--participant').length === 2 && "
                           "document.querySelectorAll('.msg--bot').length >= 3 && "
                           "document.getElementById('typing').hidden")
    stored = participant_rows(server.database)
    assert [text for text, _ in stored] == [FIRST, ANSWERS[0]]
    assert len({cid for cid in ids if cid not in first_ids}) == 1, "the same client_message_id every time"
    assert transcript(page) == [(s, t) for s, t in _all_messages(server.database)]


def _all_messages(database: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(database)
    try:
        return list(conn.execute("SELECT sender, text FROM messages ORDER BY id"))
    finally:
        conn.close()


# --- the newest message in view -------------------------------------------------------------------

def test_newest_message_in_view_after_a_reload_and_with_the_keyboard_open(
        live_server: Callable[..., Any], phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    page = browser.open()
    long_conversation(page)
    assert page.evaluate("document.getElementById('scroller').scrollTop") > 0, "needs a transcript taller than 844"
    assert page.evaluate(HIDDEN_PX) == 0

    page.reload()
    page.wait_for_selector(".msg--participant")
    page.wait_for_function(f"() => ({HIDDEN_PX})() === 0")
    # And it stays so once everything has settled (fonts, the composer's own height).
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    assert page.evaluate(HIDDEN_PX) == 0

    # The on-screen keyboard takes the lower 364 px (what the issue measured): the newest message moves up.
    page.locator("#message").focus()
    page.set_viewport_size({"width": PHONE["width"], "height": PHONE["height"] - 364})
    page.wait_for_function("() => window.innerHeight === 480")
    page.wait_for_function(f"() => ({HIDDEN_PX})() === 0")
    composer = page.locator("#composer").bounding_box()
    assert composer is not None and composer["y"] + composer["height"] <= 480
    # Typing a long message grows the composer: the newest message still shows above it.
    page.locator("#message").fill("line\n" * 5)
    page.wait_for_function(f"() => ({HIDDEN_PX})() === 0")
    page.set_viewport_size(PHONE)
    page.wait_for_function(f"() => ({HIDDEN_PX})() === 0")
    assert 'interactive-widget=resizes-content' in (page.locator('meta[name=viewport]').get_attribute("content") or "")


def test_a_reply_does_not_pull_a_reader_away_but_says_it_came(live_server: Callable[..., Any],
                                                              phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    page = browser.open()
    long_conversation(page)

    held: list[Any] = []
    page.route("**/api/sessions/*/messages", lambda route: held.append(route))
    bots = page.locator(".msg--bot").count()
    page.locator("#message").fill("They offered nothing at all.")
    page.locator("#message").press("Enter")
    page.wait_for_function("() => !document.getElementById('typing').hidden")
    assert page.evaluate(HIDDEN_PX) == 0, "the participant's own message is brought into view"
    # Scrolls up to read (and the page has heard the scroll event before the reply is let through).
    page.evaluate("""() => new Promise(done => { const s = document.getElementById('scroller');
      s.addEventListener('scroll', () => requestAnimationFrame(done), {once: true}); s.scrollTop = 0; })""")
    while not held:
        page.wait_for_timeout(20)
    held[0].continue_()
    page.wait_for_function("n => document.querySelectorAll('.msg--bot').length > n", arg=bots)
    page.wait_for_selector("#jump:not([hidden])")
    assert page.evaluate("document.getElementById('scroller').scrollTop") == 0, "the reader stays where they were"
    assert page.evaluate(HIDDEN_PX) > 0

    page.locator("#jump").click()
    page.wait_for_function(f"() => ({HIDDEN_PX})() === 0")
    assert page.locator("#jump").is_hidden()
    page.unroute("**/api/sessions/*/messages")

    # At the end (not scrolled up), a reply scrolls into view by itself.
    send(page, "I will not buy from them again.") if expects(page) == "message" else send(page, EMAIL)
    assert page.evaluate(HIDDEN_PX) == 0 and page.locator("#jump").is_hidden()


# --- nothing typed is lost ------------------------------------------------------------------------

def test_a_draft_survives_a_reload(live_server: Callable[..., Any], phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    page = browser.open()
    send(page, FIRST)
    draft = "It was a present for my mother,\nand she was so disappointed"
    page.locator("#message").fill(draft)
    page.reload()
    page.wait_for_selector(".msg--participant")
    assert page.locator("#message").input_value() == draft
    assert "/ 2000" in page.locator("#counter").inner_text() and not page.locator("#send").is_disabled()
    # Typed on, the draft follows; sent, it is gone.
    page.locator("#message").press("End")
    page.keyboard.type(" ...")
    page.reload()
    page.wait_for_selector(".msg--participant")
    assert page.locator("#message").input_value() == draft + " ..."
    send(page, draft + " ...")
    page.reload()
    page.wait_for_selector(".msg--participant")
    assert page.locator("#message").input_value() == ""
    # The draft belongs to this session in this tab: another study link (another session) starts empty.
    other = browser.open("?PROLIFIC_PID=someone-else")
    assert other.locator("#message").input_value() == ""


def test_text_typed_where_another_tab_finished_the_conversation_is_kept(
        live_server: Callable[..., Any], phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    page = browser.open()
    token = page.evaluate("Object.entries(localStorage).find(([k]) => k.startsWith('combot:session:'))[1]")
    typed = "Also, the shop's phone line was always busy."
    page.locator("#message").fill(typed)
    # Another tab (here a plain HTTP client) finishes the conversation while this one has text in the box.
    with httpx.Client(base_url=server.url, timeout=30) as client:
        turn = client.get(f"api/sessions/{token}").json().get("turn")
        answers = iter([FIRST, "one", "two", "three", "four", "five", EMAIL])
        expected = "message"
        while expected != "done":
            body: dict[str, Any] = {"text": next(answers)}
            if turn is not None:
                body["turn"] = turn
            reply = client.post(f"api/sessions/{token}/messages", json=body)
            assert reply.status_code == 200, reply.text
            expected, turn = reply.json()["expects"], reply.json().get("turn")
    page.locator("#message").press("Enter")
    page.wait_for_selector("#ended:not([hidden])")
    assert page.locator("#kept").is_visible()
    assert page.locator("#kept-text").inner_text() == typed
    assert ("participant", typed) not in transcript(page)
    page.reload()  # still kept after a reload
    page.wait_for_selector("#ended:not([hidden])")
    assert page.locator("#kept-text").inner_text() == typed


# --- every script reads right ---------------------------------------------------------------------

def test_right_to_left_messages_and_long_words(live_server: Callable[..., Any],
                                               phone: Callable[[str], Phone]) -> None:
    server = live_server(workers=1)
    browser = phone(server.url)
    page = browser.open()
    hebrew = "הקומקום שהזמנתי נשבר אחרי יומיים!"
    arabic = "وصل الطلب متأخرا أسبوعين 😡"
    long_url = "https://example.com/orders/" + "a1b2c3" * 30
    long_word = "Donaudampfschifffahrtsgesellschaftskapitänswitwenrentenversicherung" * 2
    for text in (hebrew, arabic, f"My order: {long_url} {long_word}"):
        send(page, text)
    bubbles = page.locator(".msg--participant .bubble__text")
    assert bubbles.nth(0).get_attribute("dir") == "auto"
    assert [bubbles.nth(i).evaluate("e => getComputedStyle(e).direction") for i in range(3)] == ["rtl", "rtl", "ltr"]
    # The writer's "!" ends the Hebrew sentence, so it sits at its left end; the emoji ends the Arabic one.
    edges = """e => { const r = document.createRange(), t = e.firstChild, n = t.length;
      const box = (a, b) => { r.setStart(t, a); r.setEnd(t, b); return r.getBoundingClientRect(); };
      return [box(0, 1).left, box(n - 2, n).left, box(n - 1, n).left]; }"""
    first_letter, _, bang = bubbles.nth(0).evaluate(edges)
    assert bang < first_letter, "the exclamation mark should be at the left end of a right-to-left sentence"
    arabic_first, emoji, _ = bubbles.nth(1).evaluate(edges)
    assert emoji < arabic_first
    # Right-aligned inside the bubble, as its start is on the right.
    assert bubbles.nth(0).evaluate("e => getComputedStyle(e).textAlign") in ("start", "right")
    # Long words and URLs wrap inside the bubble; nothing scrolls sideways.
    assert page.evaluate("document.documentElement.scrollWidth") == PHONE["width"]
    assert bubbles.nth(2).evaluate("e => e.scrollWidth <= e.clientWidth")
    assert page.evaluate("() => { const s = document.getElementById('scroller'); return s.scrollWidth <= s.clientWidth }")
    # The composer takes the writer's direction too.
    page.locator("#message").fill(hebrew)
    assert page.locator("#message").evaluate("e => e.matches(':dir(rtl)')")
