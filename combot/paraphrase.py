"""The offline paraphraser: reflects the participant's words back in the second person."""

from __future__ import annotations

import random
import re

# First person -> second person. Applied word by word; case is restored afterwards.
_REFLECT = {
    "i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself",
    "we": "you", "us": "you", "our": "your", "ours": "yours", "ourselves": "yourselves",
    "i'm": "you're", "im": "you're", "i've": "you've", "ive": "you've", "i'd": "you'd", "i'll": "you'll",
    "we're": "you're", "we've": "you've", "we'd": "you'd", "we'll": "you'll",
    "am": "are", "was": "were",
    "you": "I", "your": "my", "yours": "mine", "yourself": "myself",
}
# "was" only changes after a first-person subject ("I was" -> "you were", "it was" stays).
_FIRST_PERSON = {"i", "we"}
# Sentence openers safe to lower-case mid-sentence (a brand or a name keeps its capital).
_COMMON_OPENERS = {
    "the", "a", "an", "it", "this", "that", "these", "those", "they", "he", "she", "you", "your", "yours",
    "there", "so", "then", "last", "yesterday", "today", "when", "after", "before", "on", "in", "at", "about",
    "recently", "well", "basically", "ordered", "bought", "got", "went", "had", "my", "our", "some", "one",
}
_WORD = re.compile(r"[A-Za-z']+|[^A-Za-z']+")
_MAX_WORDS = 30


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    parts = re.split(r"(?<=[.!?])\s+", text)
    sentence = parts[0] if parts else text
    # A greeting such as "Hi!" says little: use the next sentence when there is one.
    if len(sentence.split()) <= 2 and len(parts) > 1:
        sentence = parts[1]
    return sentence


def reflect(text: str) -> str:
    """Turn 'I ordered a lamp and my box was crushed!' into 'you ordered a lamp and your box was crushed'."""
    sentence = _first_sentence(text)
    words = sentence.split()
    if len(words) > _MAX_WORDS:
        sentence = " ".join(words[:_MAX_WORDS]) + " ..."
    out: list[str] = []
    previous = ""
    for token in _WORD.findall(sentence):
        lower = token.lower()
        if lower in _REFLECT and (lower != "was" or previous in _FIRST_PERSON) and (lower != "am" or previous == "i"):
            replacement = _REFLECT[lower]
            if token.isupper() and len(token) > 1:
                replacement = replacement.upper()
            out.append(replacement)
        else:
            out.append(token)
        if token.strip():
            previous = lower if lower.strip("'").isalpha() else ""
    result = "".join(out).strip()
    result = result.rstrip(" .!?,;:")
    first = result.split(" ", 1)[0]
    if first.lower() in _COMMON_OPENERS and first != "I":
        result = first.lower() + result[len(first):]
    return result or "you had a bad experience"


# A reply of a few words ("no", "yes it was") reads badly as a reflection.
MIN_REFLECTION_WORDS = 4


def paraphrase(text: str, templates: tuple[str, ...], rng: random.Random, short_templates: tuple[str, ...] = ()) -> str:
    """Fill one template at random with the reflection of the participant's text.

    For a very short message, a template from `short_templates` is used instead when there is one.
    """
    return choose_paraphrase(text, templates, rng, short_templates)[0]


def choose_paraphrase(text: str, templates: tuple[str, ...], rng: random.Random, short_templates: tuple[str, ...] = (),
                      used: tuple[str, ...] = ()) -> tuple[str, str]:
    """`paraphrase`, avoiding the templates in `used` while others remain; also returns the one chosen.

    Templates are named "t<i>" (of `templates`) and "s<i>" (of `short_templates`). A conversation
    keeps the names it used, so the bot does not say the same sentence twice (a fixed short text,
    or a template without {reflection}) until it has said every other one.
    """
    reflection = reflect(text)
    prefix = "t"
    if short_templates and len(reflection.split()) < MIN_REFLECTION_WORDS:
        templates, prefix = short_templates, "s"
    fresh = [i for i in range(len(templates)) if f"{prefix}{i}" not in used] or list(range(len(templates)))
    choice = rng.choice(fresh)
    return templates[choice].replace("{reflection}", reflection), f"{prefix}{choice}"
