"""Accessibility of every page in Chromium: axe-core (the copy bundled in the axe-playwright-python wheel, injected
by Playwright, nothing fetched) on the consent, chat, end, sign-in and dashboard pages; the keyboard; the dashboard
on a 390 px phone."""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest

from tests.test_page import EMAIL, FIRST, Phone, browser, expects, phone, send, sync_api  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

axe_sync = pytest.importorskip("axe_playwright_python.sync_playwright",
                               reason="axe-playwright-python is not installed (pip install -e .[test])")

TOKEN = "a11y-test-token-0123456789"


def violations(page: Any) -> list[str]:
    """Every axe-core violation on the page as 'rule: selector', so a failure names what to fix."""
    found = axe_sync.Axe().run(page).response["violations"]
    return [f"{v['id']}: {', '.join(str(t) for node in v['nodes'] for t in node['target'])}" for v in found]


@pytest.fixture
def study_server(live_server: Callable[..., Any]) -> Any:
    # Consent on, so the consent page is there too; a known token for the dashboard.
    return live_server(workers=1, env={**os.environ, "COMBOT_CONSENT": "true", "COMBOT_ADMIN_TOKEN": TOKEN})


def sign_in(page: Any, base: str) -> None:
    page.goto(base + "admin")
    page.wait_for_selector("#token")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#cells tr').length > 0")


def test_axe_finds_no_violation_on_any_page(study_server: Any, phone: Callable[[str], Phone]) -> None:
    browser = phone(study_server.url)
    page = browser.open("?PROLIFIC_PID=axe", wait_for="#consent:not([hidden])")
    assert violations(page) == [], "consent page"

    page.locator("#consent-agree").click()
    page.wait_for_selector(".msg--bot .bubble__text")
    send(page, FIRST)
    send(page, "It was last week, and nobody answered my e-mails.")
    assert violations(page) == [], "chat page"

    answers = iter(["No refund.", "I was angry.", "Never again.", "That is all."])
    while expects(page) == "message":
        send(page, next(answers))
    send(page, EMAIL)
    assert expects(page) == "done"
    assert violations(page) == [], "end page"

    login = browser.context.new_page()
    login.goto(study_server.url + "admin")
    login.wait_for_selector("#token")
    assert violations(login) == [], "sign-in page"
    sign_in(login, study_server.url)
    assert violations(login) == [], "dashboard"
    # The one expected console line: the 403 that tells the page to ask for consent first.
    assert [e for e in browser.errors if "status of 403" not in e] == [] and not browser.outside


def test_dark_mode_chat_passes_axe_too(study_server: Any, browser: Any) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark", is_mobile=True,
                                  has_touch=True)
    try:
        page = context.new_page()
        page.goto(study_server.url + "?PROLIFIC_PID=dark")
        page.locator("#consent-agree").click()
        page.wait_for_selector(".msg--bot .bubble__text")
        send(page, FIRST)
        assert violations(page) == []
    finally:
        context.close()


def test_dashboard_fits_a_phone_and_its_cell_bars_are_readable(study_server: Any,
                                                              phone: Callable[[str], Phone]) -> None:
    browser = phone(study_server.url)
    page = browser.open("?PROLIFIC_PID=someone", wait_for="#consent:not([hidden])")
    page.locator("#consent-agree").click()
    page.wait_for_selector(".msg--bot .bubble__text")
    send(page, FIRST)

    board = browser.context.new_page()
    sign_in(board, study_server.url)
    # A mobile browser widens its layout viewport to fit content that is too wide: compare with the screen's 390.
    widths = board.evaluate("() => [window.innerWidth, document.documentElement.scrollWidth]")
    assert widths == [390, 390], f"the dashboard scrolls sideways on a 390 px phone: {widths}"
    bars = board.eval_on_selector_all("#cells .stack", "els => els.map(e => e.getBoundingClientRect().width)")
    assert len(bars) == 8 and min(bars) >= 300, bars
    filled = board.eval_on_selector_all("#cells .bar--active", "els => els.map(e => e.getBoundingClientRect().width)")
    assert max(filled) >= 300, "the one active participant's cell should show a full-length bar"
    # The rows keep their table semantics for screen readers although a phone lays them out as grids.
    assert board.locator("#cells [role=row]").count() == 8
    assert board.get_by_role("row").count() >= 9

    wide = browser.context.browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        desk = wide.new_page()
        sign_in(desk, study_server.url)
        assert desk.evaluate("getComputedStyle(document.querySelector('#cells tr')).display") == "table-row"
        assert desk.evaluate("document.documentElement.scrollWidth") <= 1200
    finally:
        wide.close()


def test_transcript_scrolls_from_the_keyboard(study_server: Any, phone: Callable[[str], Phone]) -> None:
    browser = phone(study_server.url)
    page = browser.open("?PROLIFIC_PID=keys", wait_for="#consent:not([hidden])")
    page.locator("#consent-agree").click()
    page.wait_for_selector(".msg--bot .bubble__text")
    for text in (FIRST, "It was last week, and nobody answered my e-mails.", "They offered nothing at all."):
        send(page, text)
    log = page.locator("#log")
    assert log.get_attribute("role") == "log" and log.get_attribute("tabindex") == "0"
    assert log.get_attribute("aria-live") == "polite" and log.get_attribute("aria-label")
    assert log.get_attribute("aria-relevant") == "additions" and log.get_attribute("aria-busy") == "false"
    # Every message is announced with who said it (hidden from sight, which shows it by side and colour).
    speakers = page.eval_on_selector_all("#log .msg .bubble > .visually-hidden", "els => els.map(e => e.textContent)")
    assert speakers[:2] == [f"{page.locator('#bot-name').inner_text().strip()}: ", "You: "], speakers
    assert len(speakers) == page.locator("#log .msg").count()
    scroll_top = "document.getElementById('scroller').scrollTop"
    bottom = page.evaluate(scroll_top)
    assert bottom > 0, "the test needs a transcript longer than the screen"
    log.focus()
    # Keyboard scrolling is smooth, and a key pressed while an earlier smooth scroll (the focus bringing the log
    # into view) still runs can be dropped: press again, a bounded number of times, until the scroller moved.
    def press_until(key: str, condition: str) -> None:
        for _ in range(5):
            page.keyboard.press(key)
            try:
                page.wait_for_function(f"() => {condition}", timeout=3000)
                return
            except sync_api.TimeoutError:
                continue
        raise AssertionError(f"{key} on the focused log never made {condition} true")

    press_until("Home", f"{scroll_top} === 0")
    press_until("PageDown", f"{scroll_top} > 0")


def test_consent_tab_order_follows_the_visual_order(study_server: Any, browser: Any) -> None:
    for width in (390, 1024):
        context = browser.new_context(viewport={"width": width, "height": 800})
        try:
            page = context.new_page()
            page.goto(study_server.url + f"?PROLIFIC_PID=tab{width}")
            page.wait_for_selector("#consent:not([hidden])")
            ids = ["consent-agree", "consent-decline"]
            assert page.locator("#log").get_attribute("tabindex") is None, "no empty transcript to tab through"
            # Reading order: top to bottom, then left to right (the buttons sit side by side on a wide screen).
            boxes = {i: page.locator(f"#{i}").bounding_box() for i in ids}
            visual = sorted(ids, key=lambda i: (round(boxes[i]["y"]), boxes[i]["x"]))
            tabbed = []
            for _ in ids:
                page.keyboard.press("Tab")
                tabbed.append(page.evaluate("document.activeElement.id"))
            assert tabbed == visual, f"at {width} px the buttons are seen as {visual} but tabbed as {tabbed}"
        finally:
            context.close()
