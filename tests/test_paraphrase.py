from __future__ import annotations

import random

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
