from __future__ import annotations

import csv
import random
import re
from pathlib import Path

import pytest

from combot.paraphrase import paraphrase, reflect


@pytest.mark.parametrize("text, expected", [
    ("I ordered a lamp and my box was crushed!", "you ordered a lamp and your box was crushed"),
    ("My order was late.", "your order was late"),
    ("I was shouted at by the manager", "you were shouted at by the manager"),
    ("It was broken when I opened it", "it was broken when you opened it"),
    ("I'm really upset with them", "you're really upset with them"),
    ("We waited for hours and our food was cold", "you waited for hours and your food was cold"),
    ("Hi! The courier threw my parcel over the fence.", "the courier threw your parcel over the fence"),
    ("Brightmart sold me a fake charger", "Brightmart sold you a fake charger"),
    ("They told me you would call", "they told you I would call"),
])
def test_reflect(text: str, expected: str) -> None:
    assert reflect(text) == expected


def test_reflect_cuts_long_messages() -> None:
    long = "I " + " ".join(["waited"] * 80)
    assert len(reflect(long).split()) <= 32


def test_short_messages_use_short_templates() -> None:
    rng = random.Random(1)
    assert paraphrase("no", ("So {reflection}.",), rng, ("Tell me more.",)) == "Tell me more."
    assert paraphrase("my parcel never came to me", ("So {reflection}.",), rng, ("Tell me more.",)) == \
        "So your parcel never came to you."


# --- the independent table (issue 11) ----------------------------------------------------------------
# data/paraphrase/table.csv was written by hand without looking at this code: each participant
# message with the reflections a person would accept. Its matching rule (data/paraphrase/README.md):
# equal after lower-casing, trimming and collapsing whitespace; punctuation must match; no final
# punctuation.

TABLE = Path(__file__).resolve().parent.parent / "data" / "paraphrase" / "table.csv"


def _table() -> list[tuple[str, list[str]]]:
    with open(TABLE, newline="", encoding="utf-8") as fh:
        return [(row["input"], row["acceptable"].split(" || ")) for row in csv.DictReader(fh)]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_the_table_is_big_enough_to_mean_something() -> None:
    assert len(_table()) >= 150


@pytest.mark.parametrize("text, acceptable", _table(), ids=[f"row{n + 2}" for n in range(len(_table()))])
def test_the_independent_table(text: str, acceptable: list[str]) -> None:
    got = reflect(text)
    assert not got.endswith(tuple(".!?,;:")), got
    assert _norm(got) in {_norm(a) for a in acceptable}, f"{text!r} -> {got!r}; acceptable: {acceptable}"


@pytest.mark.parametrize("text, expected", [
    # Seen in the wild (issue 11).
    ("People like me always try this.", "people like you always try this"),
    ("Can you call me back?", "can I call you back"),
    ("They were slow I guess.", "they were slow"),
    ("Yes, I felt let down.", "you felt let down"),
    # "you" as subject and as object, and the verb that goes with it.
    ("I expected you to fix it and you didn't.", "you expected me to fix it and I didn't"),
    ("You were rude to me.", "I was rude to you"),
    ("I am not happy with you people.", "you are not happy with me"),
    # Quoted speech is kept as said, in straight and curly quotes.
    ('He said "I will call you" and never did.', 'he said "I will call you" and never did'),
    ("The driver told me \u201cleave me alone\u201d and drove off.", "the driver told you \u201cleave me alone\u201d and drove off"),
    # A word that is not a filler stays: "No one", "So many".
    ("No one answered my emails.", "no one answered your emails"),
    ("So many things went wrong with my order.", "so many things went wrong with your order"),
    # Names keep their capital, common words lose it.
    ("Tesco delivered the wrong groceries to me.", "Tesco delivered the wrong groceries to you"),
    ("Every time I call, I get put on hold.", "every time you call, you get put on hold"),
])
def test_reflections_read_as_a_person_would_write(text: str, expected: str) -> None:
    assert reflect(text) == expected


def test_no_reflection_starts_with_a_filler_in_any_template() -> None:
    rng = random.Random(3)
    for text in ("Yes, I felt let down.", "Well, the courier lost it.", "Um, my order is late.", "OK so it broke."):
        sentence = paraphrase(text, ("It sounds like {reflection}. Tell me more.",), rng)
        assert not re.search(r"like (Yes|Well|Um|OK|Ok)\b", sentence), sentence
