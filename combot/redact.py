"""E-mail addresses and phone numbers a participant typed into the chat, replaced for an anonymised export.

Over-redacting a number is the safer mistake: a run of 7 to 15 digits (spaces, dots, dashes,
brackets and a leading + allowed between them) counts as a phone number, unless it reads as a date
(2024-05-01, 01/05/2024, 1.5.2024) or a price or amount with decimals.
"""

from __future__ import annotations

import re

EMAIL_MARK = "[email]"
PHONE_MARK = "[phone]"
_EMAIL = re.compile(r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_PHONE = re.compile(r"(?<![\w.,/@])\+?\(?\d[\d ().\-/]{5,}\d(?![\w@])")
_DATE = re.compile(r"^(\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4})$")
_AMOUNT = re.compile(r"^\d{1,3}(?:[ ,.]\d{3})*[.,]\d{2}$")


def _phone(match: re.Match[str]) -> str:
    found = match.group(0)
    digits = sum(ch.isdigit() for ch in found)
    if not 7 <= digits <= 15 or _DATE.match(found.strip()) or _AMOUNT.match(found.strip()):
        return found
    return PHONE_MARK


def redact(text: str) -> str:
    """`text` with e-mail addresses as [email] and phone numbers as [phone]."""
    return _PHONE.sub(_phone, _EMAIL.sub(EMAIL_MARK, text))
