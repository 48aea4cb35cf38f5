from __future__ import annotations

import csv
import random
import re
from pathlib import Path

import pytest

from combot.paraphrase import fill, paraphrase, reflect


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


@pytest.mark.parametrize("text, expected", [
    # A common word keeps no capital mid-sentence, contracted or not (seen by `combot pilot`:
    # "You wrote that That's everything you can think of.").
    ("That's everything I can think of.", "that's everything you can think of"),
    ("There's nothing else to add.", "there's nothing else to add"),
    ("Couldn't get through to anyone.", "couldn't get through to anyone"),
    ("Afterwards nobody called me.", "afterwards nobody called you"),
    # A word the participant also wrote in lower case is a common word for them ...
    ("Warehouse staff lost it and the warehouse never answered.", "warehouse staff lost it and the warehouse never answered"),
    # ... and one they capitalised mid-sentence is a name, whatever it looks like.
    ("Harding lost my file and Harding never called.", "Harding lost your file and Harding never called"),
    ("Reading my emails took them a week.", "reading your emails took them a week"),
    # Acronyms, "I" and quoted speech keep their capitals.
    ("UPS lost my parcel.", "UPS lost your parcel"),
    ("You said I would get a refund.", "I said you would get a refund"),
    ('"Not my problem" was all the manager said.', '"Not my problem" was all the manager said'),
])
def test_a_reflection_starts_in_lower_case_unless_it_starts_with_a_name(text: str, expected: str) -> None:
    assert reflect(text) == expected


def test_the_template_decides_the_capital_where_the_reflection_goes() -> None:
    said = "That's everything I can think of."
    rng = random.Random(0)
    assert paraphrase(said, ("Thanks. You wrote that {reflection}. Could you give me a little more?",), rng) == \
        "Thanks. You wrote that that's everything you can think of. Could you give me a little more?"
    assert fill("{reflection}? Tell me more.", "your parcel was late") == "Your parcel was late? Tell me more."
    assert fill("Thanks. {reflection}, you say.", "your parcel was late") == "Thanks. Your parcel was late, you say."
    assert fill("So {reflection}: and then?", "your parcel was late") == "So your parcel was late: and then?"


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


@pytest.mark.parametrize("text, expected", [
    # Discourse markers and greetings in front, with or without a comma.
    ("Honestly, the cashier was rude to me.", "the cashier was rude to you"),
    ("Basically my sofa arrived torn.", "your sofa arrived torn"),
    ("Anyway the refund never came.", "the refund never came"),
    ("Seriously, nobody called me back.", "nobody called you back"),
    ("Good morning, my parcel is late.", "your parcel is late"),
    ("Hello there, my order is missing.", "your order is missing"),
    ("Hi Combot, the waiter ignored me.", "the waiter ignored you"),
    ("Dear Sir or Madam, my order never came.", "your order never came"),
    ("Honestly speaking it was bad.", "honestly speaking it was bad"),  # not a marker before a clause
    ("Look at this mess.", "look at this mess"),
    # The verb before a swapped subject, in a question, agrees with it.
    ("Are you even listening to me?", "am I even listening to you"),
    ("Why were you so rude to me?", "why was I so rude to you"),
    ("Aren't you supposed to help?", "aren't I supposed to help"),
    ("Was I supposed to wait forever?", "were you supposed to wait forever"),
    ("Have you read my emails?", "have I read your emails"),
    ("Do you even care?", "do I even care"),
    ("It wasn't you.", "it wasn't me"),
    # "you" as the subject of a clause after hope/think/wish/said..., an object before "to".
    ("I hope you fix this.", "you hope I fix this"),
    ("I hope that you fix this.", "you hope that I fix this"),
    ("I think you lost my parcel.", "you think I lost your parcel"),
    ("I believe you are wrong.", "you believe I am wrong"),
    ("She said you lied.", "she said I lied"),
    ("I want you to refund me.", "you want me to refund you"),
    ("I need you guys to call me.", "you need me to call you"),
    ("They told you nothing.", "they told me nothing"),
    ("I know you.", "you know me"),
])
def test_markers_questions_and_clauses(text: str, expected: str) -> None:
    assert reflect(text) == expected


# --- the evaluator's hold-out ---------------------------------------------------------------------------
# data/paraphrase/paraphrase_holdout.csv: 120 rows by an independent evaluator, first measured at
# 113/120. Looked at since (data/paraphrase/README.md), so it holds the line rather than measures afresh.

HOLDOUT = TABLE.parent / "paraphrase_holdout.csv"


def test_the_evaluators_hold_out() -> None:
    with open(HOLDOUT, newline="", encoding="utf-8") as fh:
        rows = [(row["input"], row["acceptable"].split(" || ")) for row in csv.DictReader(fh)]
    assert len(rows) == 120
    failed = [(text, reflect(text)) for text, acceptable in rows
              if _norm(reflect(text)) not in {_norm(a) for a in acceptable}]
    print(f"\nparaphrase_holdout.csv: {len(rows) - len(failed)}/{len(rows)} pass")
    # One known miss: "My blender broke after a week. I want my money back." -> only the first
    # sentence is reflected, as data/paraphrase/README.md asks; the evaluator wanted both.
    assert (len(rows) - len(failed)) / len(rows) >= 0.99, failed
