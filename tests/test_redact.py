"""Phone numbers and e-mail addresses inside chat messages, replaced for an anonymised export."""

from __future__ import annotations

import pytest

from combot.redact import redact


@pytest.mark.parametrize("text, expected", [
    ("write to jane.doe+shop@mail.example.co.uk please", "write to [email] please"),
    ("call +44 20 7946 0958 after 5", "call [phone] after 5"),
    ("my number is (555) 123-4567.", "my number is [phone]."),
    ("ring 07700 900123 or 555.123.4567", "ring [phone] or [phone]"),
    ("their hotline 0800-123-4567 never answered", "their hotline [phone] never answered"),
    ("me@x.org / +1-202-555-0143", "[email] / [phone]"),
])
def test_addresses_and_numbers_are_replaced(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "It arrived on 2024-05-01, three weeks late.",
    "ordered on 12/05/2024 and again on 1.5.2024",
    "it cost 1,299.00 and the refund was 45.99",
    "order 123456 was lost",
    "I waited 3 weeks, 2 days and 14 hours",
    "model X-1000 broke",
])
def test_dates_amounts_and_short_numbers_stay(text: str) -> None:
    assert redact(text) == text
