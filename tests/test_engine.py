from __future__ import annotations

import pytest

from combot import engine
from combot.engine import State
from combot.study import load_study
from tests.conftest import DEFAULT_STUDY

STUDY = load_study(DEFAULT_STUDY)
HIGH = {"brand": "basic", "think": "high", "feel": "high"}
LOW = {"brand": "bramble", "think": "low", "feel": "low"}


def walk(cell: dict[str, str], problem: str, messages: list[str], seed: int = 7) -> list[engine.Step]:
    state, _ = engine.start(STUDY, cell)
    steps = []
    for text in messages:
        step = engine.respond(STUDY, cell, state, text, problem=problem if engine.needs_classification(state) else None,
                              seed=seed, link_values={"participant_id": "p123", "cell": "3"})
        steps.append(step)
        state = step.state
    return steps


CHAT = ["My toaster caught fire on day two.", "It smoked.", "The shop ignored me.", "No refund.", "I gave up."]


@pytest.mark.parametrize("cell, problem, kinds", [
    (HIGH, "A", ["question"] * 4 + ["empathy", "closing"]),
    (HIGH, "B", ["question"] * 4 + ["empathy", "closing"]),
    (HIGH, "Other", ["paraphrase"] * 4 + ["empathy", "closing"]),
    (LOW, "A", ["paraphrase"] * 4 + ["closing"]),
    (LOW, "C", ["paraphrase"] * 4 + ["closing"]),
    ({**HIGH, "feel": "low"}, "C", ["question"] * 4 + ["closing"]),
])
def test_turn_structure(cell: dict[str, str], problem: str, kinds: list[str]) -> None:
    steps = walk(cell, problem, CHAT)
    assert [r.kind for s in steps for r in s.replies] == kinds
    assert [s.expects for s in steps] == ["message"] * 4 + ["email"]


@pytest.mark.parametrize("cell", [HIGH, {**HIGH, "brand": "bramble"}])
@pytest.mark.parametrize("problem", ["A", "B", "C"])
@pytest.mark.parametrize("seed", range(5))
def test_scripted_questions_never_repeat_and_come_from_the_problem_bank(cell: dict[str, str], problem: str, seed: int) -> None:
    steps = walk(cell, problem, CHAT[:4], seed=seed)
    asked = [s.replies[0].text for s in steps]
    assert len(set(asked)) == 4
    assert set(asked) <= set(STUDY.texts("questions", cell, problem))


def test_the_branded_bank_is_used_for_the_brand() -> None:
    bramble = walk({**HIGH, "brand": "bramble"}, "C", CHAT[:1])[0].replies[0].text
    assert "Bramble" in bramble
    assert "Bramble" not in walk(HIGH, "C", CHAT[:1])[0].replies[0].text


def test_greetings_differ_by_brand_and_think_and_never_name_the_condition() -> None:
    greetings = {STUDY.cell_label(c): engine.start(STUDY, c)[1][0].text for c in STUDY.cells()}
    assert len(set(greetings.values())) == 4
    for text in greetings.values():
        for word in ("high", "low", "think", "feel", "condition", "cell"):
            assert word not in text.lower().split()


def test_paraphrase_reflects_the_participant() -> None:
    step = walk(LOW, "B", ["My parcel was left in the rain and I was furious about it."])[0]
    assert "your parcel was left in the rain and you were furious" in step.replies[0].text
    assert step.replies[0].produced_by == "template"
    assert step.replies[0].llm_task == "paraphrase"


@pytest.mark.parametrize("address, accepted", [
    ("someone@example.com", True),
    ("  first.last+tag@sub.example.co.uk ", True),
    ("someone@example", False),
    ("not an email", False),
    ("a@b.c", False),
    ("<script>@x.com", False),
    ("x" * 250 + "@example.com", False),
])
def test_email_validation(address: str, accepted: bool) -> None:
    steps = walk(HIGH, "A", CHAT + [address])
    last = steps[-1]
    if accepted:
        assert last.state.stage == "done" and last.email == address.strip()
        assert last.replies[0].kind == "thanks"
        assert last.replies[0].link is not None and "pid=p123" in last.replies[0].link.url
        assert address.strip() not in last.replies[0].link.url
    else:
        assert last.state.stage == "email" and last.email is None
        assert last.replies[0].kind == "email_retry"


def test_no_message_after_the_end() -> None:
    steps = walk(HIGH, "A", CHAT + ["someone@example.com"])
    with pytest.raises(ValueError):
        engine.respond(STUDY, HIGH, steps[-1].state, "hello again")


@pytest.mark.parametrize("seed", range(40))
def test_a_paraphrase_sentence_is_not_said_twice_while_others_remain(seed: int) -> None:
    # Found by `combot pilot`: short answers drew the same short text (and the catch-all's template
    # without {reflection}) twice in one conversation, so the bot repeated itself word for word.
    short = walk(LOW, "Other", ["My card was charged twice.", "No.", "Yes.", "Maybe.", "Ok."], seed=seed)
    texts = [r.text for s in short[1:3] for r in s.replies]
    assert len(set(texts)) == 2  # the catch-all has two short texts: both, before either again
    paraphrases = [r.text for s in walk(HIGH, "Other", ["one two three four five six"] * 4, seed=seed)[:4]
                   for r in s.replies]
    assert len(set(paraphrases)) == 4


def test_first_message_needs_a_problem_type() -> None:
    state, _ = engine.start(STUDY, HIGH)
    assert engine.needs_classification(state)
    with pytest.raises(ValueError):
        engine.respond(STUDY, HIGH, state, "hello")


def test_an_unknown_problem_type_becomes_the_catch_all() -> None:
    step = walk(HIGH, "Z", CHAT[:1])[0]
    assert step.state.problem == "Other" and step.replies[0].kind == "paraphrase"


def test_state_round_trips() -> None:
    state = State(stage="email", turn=5, problem="B", asked=(0, 3, 2), phrased=("t1", "s0"))
    assert State.from_dict(state.to_dict()) == state


@pytest.mark.parametrize("template, values, expected", [
    ("https://s.example/?pid={participant_id}", {"participant_id": "p1"}, "https://s.example/?pid=p1"),
    ("https://s.example/?x={PROLIFIC_PID}&c={cell}", {"PROLIFIC_PID": "a b&c=d", "cell": "2"},
     "https://s.example/?x=a%20b%26c%3Dd&c=2"),
    ("https://s.example/?x={missing}", {}, "https://s.example/?x="),
])
def test_fill_template_encodes_values(template: str, values: dict[str, str], expected: str) -> None:
    assert engine.fill_template(template, values) == expected


def test_the_same_seed_gives_the_same_conversation() -> None:
    first = [r.text for s in walk(HIGH, "A", CHAT, seed=42) for r in s.replies]
    again = [r.text for s in walk(HIGH, "A", CHAT, seed=42) for r in s.replies]
    assert first == again


def test_an_email_can_be_declined_when_the_study_allows_it(study_file) -> None:  # type: ignore[no-untyped-def]
    study = load_study(study_file({"email_skip_words = []": 'email_skip_words = ["skip", "No thanks"]'}))
    assert study.email_skip_words == ("skip", "no thanks")
    state, _ = engine.start(study, HIGH)
    for text in CHAT:
        state = engine.respond(study, HIGH, state, text, problem="A" if engine.needs_classification(state) else None,
                               link_values={"participant_id": "p1"}).state
    declined = engine.respond(study, HIGH, state, "no thanks!", link_values={"participant_id": "p1"})
    assert declined.state.stage == "done" and declined.email is None and declined.email_declined
    assert declined.replies[0].kind == "thanks" and declined.replies[0].link is not None
    # With the default study, "skip" is not an address and is asked again.
    assert engine.respond(STUDY, HIGH, state, "skip").state.stage == "email"


def _open(cell: dict[str, str], verdicts: list[tuple[str, bool | None]], study=STUDY) -> list[engine.Step]:  # type: ignore[no-untyped-def]
    """Opening messages with the classifier's (problem, described) verdict on each."""
    state, _ = engine.start(study, cell)
    steps = []
    for problem, described in verdicts:
        assert engine.needs_classification(state)
        step = engine.respond(study, cell, state, "whatever", problem=problem, described=described, seed=3)
        steps.append(step)
        state = step.state
    return steps


def test_a_greeting_is_re_prompted_and_the_complaint_decides_the_problem_type() -> None:
    steps = _open(HIGH, [("Other", False), ("B", True)])
    assert [r.kind for r in steps[0].replies] == ["reprompt"]
    assert steps[0].replies[0].text == STUDY.text("reprompt", HIGH)
    assert steps[0].state.problem is None and steps[0].state.turn == 0 and steps[0].state.reprompts == 1
    assert not steps[0].settled_opening and steps[0].described_experience is None
    assert steps[1].settled_opening and steps[1].described_experience is True
    assert steps[1].state.problem == "B" and steps[1].replies[0].kind == "question"
    assert steps[1].replies[0].text in STUDY.texts("questions", HIGH, "B")


def test_after_max_reprompts_the_last_attempt_decides_and_is_flagged() -> None:
    assert STUDY.max_reprompts == 2
    steps = _open(LOW, [("Other", False), ("Other", False), ("A", False)])
    assert [s.replies[0].kind for s in steps] == ["reprompt", "reprompt", "paraphrase"]
    assert steps[-1].settled_opening and steps[-1].described_experience is False and steps[-1].state.problem == "A"
    # Then the conversation carries on with all its follow-ups: re-prompts are not follow-ups.
    state = steps[-1].state
    kinds = []
    while state.stage == "chat":
        step = engine.respond(STUDY, LOW, state, "More about it.")
        kinds += [r.kind for r in step.replies]
        state = step.state
    assert kinds == ["paraphrase"] * 3 + ["closing"]


def test_without_an_opener_verdict_or_with_max_reprompts_zero_the_first_message_decides(study_file) -> None:  # type: ignore[no-untyped-def]
    assert _open(HIGH, [("A", None)])[0].settled_opening
    assert _open(HIGH, [("A", None)])[0].described_experience is None
    never = load_study(study_file({"max_reprompts = 2": "max_reprompts = 0"}))
    step = _open(HIGH, [("Other", False)], study=never)[0]
    assert step.settled_opening and step.described_experience is False and step.replies[0].kind == "paraphrase"


def test_re_prompts_never_name_the_condition() -> None:
    for cell in STUDY.cells():
        text = STUDY.text("reprompt", cell).lower()
        for secret in ("think", "feel", "high", "low", "condition", "cell"):
            assert secret not in text


def test_a_study_without_reprompt_texts_names_the_fix(study_file) -> None:  # type: ignore[no-untyped-def]
    from combot.errors import ConfigError

    path = study_file({'[[reprompt]]\nwhen = { brand = "basic", think = "low" }': '[[greeting]]\nwhen = { brand = "basic", think = "low" }'})
    with pytest.raises(ConfigError, match=r"no \[\[reprompt\]\] block applies to cell basic-low-high.*max_reprompts = 0"):
        load_study(path)


@pytest.mark.parametrize("text", ["hi", "Hello!", "good morning :)", "hey there", "ok", "Um, hi", "how are you?",
                                  "thanks", "yes", "test"])
def test_a_greeting_is_likely_reprompted_while_reprompts_are_left(text: str) -> None:
    assert engine.likely_reprompted(STUDY, State(), text)
    assert not engine.likely_reprompted(STUDY, State(reprompts=STUDY.max_reprompts), text)  # taken as it is then
    assert not engine.likely_reprompted(STUDY, State(turn=1), text)  # not an opening


@pytest.mark.parametrize("text", ["broken", "rude", "late", "scam", "not ok", "no reply", "hi, my order is late",
                                  "hello, they charged me twice", "Mi paquete nunca llegó", "hi 2 weeks",
                                  "kaputt", "hi 😡", "I have a complaint", ""])
def test_anything_more_than_greeting_words_is_not(text: str) -> None:
    assert not engine.likely_reprompted(STUDY, State(), text)


def test_no_experience_written_for_the_opener_head_looks_like_a_greeting() -> None:
    """The guess never holds back an experience (data/openers/: every file, 698 experiences)."""
    import csv
    import io
    from pathlib import Path

    rows = [row for path in sorted((Path(__file__).resolve().parent.parent / "data" / "openers").glob("*.csv"))
            for row in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))]
    experiences = [row["text"] for row in rows if row["label"] == "experience"]
    assert len(experiences) > 600
    assert [text for text in experiences if engine.likely_reprompted(STUDY, State(), text)] == []
    assert sum(engine.likely_reprompted(STUDY, State(), row["text"]) for row in rows) >= 80
