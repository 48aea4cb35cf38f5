"""The study engine: what the bot says next. Pure: no I/O, no clock, no global randomness.

`start` gives the greeting; `respond` takes the participant's state and new message (with the
classifier's verdict on the opening ones) and returns the next state and the bot's replies. An
opening that holds no experience yet ("hi", "ok") gets a re-prompt, up to `max_reprompts` times;
the problem type is decided on the first message that describes one.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import Any, Literal, Mapping
from urllib.parse import quote

from combot.paraphrase import choose_paraphrase
from combot.study import Cell, Study

Stage = Literal["chat", "email", "done"]
Expects = Literal["message", "email", "done"]
EMAIL = re.compile(r"^[^@\s<>()\[\],;:\"]+@[^@\s<>()\[\],;:\"]+\.[A-Za-z]{2,}$")
MAX_EMAIL_LENGTH = 254


@dataclass(frozen=True)
class Link:
    url: str
    label: str


@dataclass(frozen=True)
class Reply:
    """One bot message. `llm_task` marks text an LLM may rewrite; the text here is the offline one."""

    kind: str
    text: str
    produced_by: str = "script"
    link: Link | None = None
    llm_task: str | None = None
    source_text: str | None = None


@dataclass(frozen=True)
class State:
    stage: Stage = "chat"
    turn: int = 0  # participant messages answered so far
    problem: str | None = None
    asked: tuple[int, ...] = ()
    phrased: tuple[str, ...] = ()  # paraphrase templates used so far (see paraphrase.choose_paraphrase)
    reprompts: int = 0  # times the bot asked again because the opening held no experience yet

    def to_dict(self) -> dict[str, object]:
        return {"stage": self.stage, "turn": self.turn, "problem": self.problem, "asked": list(self.asked),
                "phrased": list(self.phrased), "reprompts": self.reprompts}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> State:
        return cls(stage=data.get("stage", "chat"), turn=int(data.get("turn", 0)), problem=data.get("problem"),
                   asked=tuple(int(i) for i in data.get("asked") or []),
                   phrased=tuple(str(name) for name in data.get("phrased") or []),
                   reprompts=int(data.get("reprompts", 0)))


@dataclass(frozen=True)
class Step:
    state: State
    replies: tuple[Reply, ...]
    email: str | None = None
    email_declined: bool = False
    # Set on the step that settles the opening (the problem type is fixed): whether an experience was
    # described (None: no opener verdict was given, so it is unknown). False/True only then.
    described_experience: bool | None = None
    settled_opening: bool = False

    @property
    def expects(self) -> Expects:
        return expects(self.state)


def expects(state: State) -> Expects:
    return {"chat": "message", "email": "email", "done": "done"}[state.stage]  # type: ignore[return-value]


def needs_classification(state: State) -> bool:
    """The opening decides the problem type; the caller classifies each opening message before `respond`."""
    return state.stage == "chat" and state.turn == 0


# An opening made of these words alone (and punctuation) holds no experience yet.
_GREETING_WORDS = frozenset("""
hi hello hey hiya heya howdy yo hallo greetings good morning afternoon evening day there everyone all folks
ok okay k kk um umm uh uhm erm hmm hm yes yeah yep yup no nope sure alright thanks thank you ty lol oh ah
test testing how are doing what's whats up sup
""".split())


def likely_reprompted(study: Study, state: State, text: str) -> bool:
    """Whether an opening will most likely be re-prompted, judged before the classifier has seen it:
    re-prompts are left and the text is greeting and filler words only ("hi", "good morning!", "ok",
    "how are you?"), with no digit, emoji or other script (a complaint in another language). A guess
    for sparing an early LLM call only: the opener head decides. Of the messages in data/openers/,
    90 are such openings and the opener head re-prompts every one; none of the 698 experiences is one.
    """
    if not needs_classification(state) or state.reprompts >= study.max_reprompts:
        return False
    lower = text.lower()
    words = re.findall(r"[a-z']+", lower)
    if not words or len(words) > 6 or re.sub(r"[a-z'\s.,!?:;()\-]+", "", lower):
        return False
    return all(word in _GREETING_WORDS for word in words)


def start(study: Study, cell: Cell) -> tuple[State, tuple[Reply, ...]]:
    return State(), (Reply("greeting", study.text("greeting", cell)),)


def respond(study: Study, cell: Cell, state: State, text: str, *, problem: str | None = None, seed: int = 0,
            link_values: Mapping[str, str] | None = None, described: bool | None = None) -> Step:
    """The next state and replies after the participant's message `text`.

    For an opening message the caller passes the classifier's `problem` type and `described`: whether
    the message describes an experience at all (None when no opener verdict exists: it counts as one).
    """
    if state.stage == "done":
        raise ValueError("the conversation is over")
    if state.stage == "email":
        return _email(study, cell, state, text, link_values or {})
    settled = needs_classification(state)
    if settled:
        if problem is None:
            raise ValueError("the first message needs a problem type")
        if described is False and state.reprompts < study.max_reprompts:
            again = replace(state, reprompts=state.reprompts + 1)
            return Step(again, (Reply("reprompt", study.text("reprompt", cell)),))
        if problem not in study.problem_types:
            problem = study.catch_all
        state = replace(state, problem=problem)
    state = replace(state, turn=state.turn + 1)
    followups_given = state.turn - 1
    described_out = described if settled else None
    if followups_given < study.followup_turns:
        reply, state = _followup(study, cell, state, text, random.Random(f"{seed}:{state.turn}"))
        return Step(state, (reply,), described_experience=described_out, settled_opening=settled)
    return Step(replace(state, stage="email"), _closing(study, cell), described_experience=described_out,
                settled_opening=settled)


def _followup(study: Study, cell: Cell, state: State, text: str, rng: random.Random) -> tuple[Reply, State]:
    problem = state.problem or study.catch_all
    if study.followup_mode(cell) == "questions" and problem != study.catch_all:
        bank = study.texts("questions", cell, problem)
        unused = [i for i in range(len(bank)) if i not in state.asked]
        if unused:
            # The first question of a bank opens the topic; the rest come in random order.
            choice = unused[0] if not state.asked else rng.choice(unused)
            return Reply("question", bank[choice]), replace(state, asked=state.asked + (choice,))
    block = study.block("paraphrase", cell, problem)
    assert block is not None  # load_study checks every cell and problem type has one
    text_out, template = choose_paraphrase(text, tuple(block.values["texts"]), rng,
                                           tuple(block.values.get("short_texts", ())), state.phrased)
    return Reply("paraphrase", text_out, "template", llm_task="paraphrase",
                 source_text=text), replace(state, phrased=state.phrased + (template,))


def _closing(study: Study, cell: Cell) -> tuple[Reply, ...]:
    replies = []
    empathy = study.text("empathy", cell)
    if empathy.strip():
        replies.append(Reply("empathy", empathy))
    replies.append(Reply("closing", study.text("closing", cell)))
    return tuple(replies)


def _email(study: Study, cell: Cell, state: State, text: str, link_values: Mapping[str, str]) -> Step:
    candidate = text.strip()
    link = survey_link(study, link_values)
    if candidate.lower().strip(" .!") in study.email_skip_words:
        thanks = Reply("thanks", study.text("thanks", cell), link=link)
        return Step(replace(state, stage="done"), (thanks,), email_declined=True)
    if len(candidate) > MAX_EMAIL_LENGTH or not EMAIL.match(candidate):
        return Step(state, (Reply("email_retry", study.text("email_retry", cell)),))
    thanks = Reply("thanks", study.text("thanks", cell), link=link)
    return Step(replace(state, stage="done"), (thanks,), email=candidate)


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """Put URL-encoded values into {placeholders}; an unknown placeholder becomes empty."""
    return re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: quote(str(values.get(m.group(1), "")), safe=""), template)


def survey_link(study: Study, values: Mapping[str, str]) -> Link | None:
    if not study.survey_url:
        return None
    return Link(fill_template(study.survey_url, values), study.survey_label)
