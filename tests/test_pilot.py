"""`combot pilot`: personas, flags and the report (fast), and real pilots of real servers (slow)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner

from combot import pilot_report
from combot.cli import cli
from combot.errors import ConfigError
from combot.fakellm import play_persona, start_fake_llm
from combot.personas import PERSONAS, PLAYER_MARKER, ScriptedSpeaker, email_answers, topic_of
from combot.pilot import PilotError, PilotOptions, run_pilot
from combot.study import load_study
from tests.conftest import DEFAULT_STUDY

EMPATHY = ("Thank you for telling me all of this. I can really understand how upsetting and frustrating that"
           " experience must have been for you, and I'm sorry you went through it.")
FEEL_LOW_EMPTY = 'when = { feel = "low" }\ntext = ""'


# --- personas -------------------------------------------------------------------------------------

def test_the_bank_covers_what_a_pilot_must_meet() -> None:
    assert {p.problem for p in PERSONAS} == {"A", "B", "C", "Other"}
    assert any(p.openings[0].lower() in ("hi", "hello") and len(p.openings) > 1 for p in PERSONAS), "greeting first"
    assert any(p.declines_email for p in PERSONAS) and any(p.bad_email_first for p in PERSONAS)
    assert any("non-native" in p.style for p in PERSONAS) and any("typo" in p.style for p in PERSONAS)
    assert any("angry" in p.style for p in PERSONAS)
    lengths = [len(p.openings[-1].split()) for p in PERSONAS]
    assert min(lengths) <= 10 and max(lengths) >= 50, "terse and rambling writers"
    assert len({p.key for p in PERSONAS}) == len(PERSONAS)
    # The first four (what --per-cell 4 meets) already cover all four problem types.
    assert {p.problem for p in PERSONAS[:4]} == {"A", "B", "C", "Other"}


def test_a_scripted_persona_answers_the_question_asked_from_its_own_story() -> None:
    sofa = next(p for p in PERSONAS if p.key == "sofa-rambler")
    speaker = ScriptedSpeaker(sofa)
    assert speaker.next_message(["Hello, what happened?"]) == sofa.openings[0]
    assert speaker.next_message(["What did the tracking information or the delivery company tell you?"]) \
        == sofa.answers["tracking"]
    assert speaker.next_message(["Did you contact the seller or the courier about it? What did they say?"]) \
        == sofa.answers["contact"]
    # Asked about the same topic again, it adds something new rather than repeating itself.
    again = speaker.next_message(["Did you complain to anyone?"])
    assert again not in (sofa.answers["contact"], sofa.openings[0])
    assert topic_of("When was the order supposed to arrive, and when did it turn up?") == "when"
    assert topic_of("Did anyone else, such as a manager, get involved?") == "others"
    assert topic_of("Lovely weather.") is None
    assert topic_of("Whenever you're ready, tell me about a time a company let you down. What happened?") == "detail"


def test_the_decliner_declines_only_where_the_study_allows_it() -> None:
    decliner = next(p for p in PERSONAS if p.declines_email)
    assert email_answers(decliner, ["skip", "no thanks"]) == ["skip"]
    given = email_answers(decliner, [])
    assert len(given) == 1 and "@" in given[0]
    typo = next(p for p in PERSONAS if p.bad_email_first)
    assert email_answers(typo, []) == [typo.bad_email_first, typo.email]


def test_the_fake_llm_plays_the_persona_from_its_system_prompt_only() -> None:
    persona = PERSONAS[1]
    system = {"role": "system", "content": persona.system_prompt()}
    first = play_persona([system, {"role": "user", "content": "Hi, what happened?"}])
    assert first == persona.openings[0]
    second = play_persona([system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": first or ""},
                           {"role": "user", "content": "When was that?"}])
    assert second == list(persona.answers.values())[0]
    # The study's own paraphrase prompt is not a persona: the fake paraphrases as before.
    assert play_persona([{"role": "system", "content": "You are a customer-service assistant."},
                         {"role": "user", "content": "x"}]) is None


# --- flags and the report, from hand-made transcripts -----------------------------------------------

def _cell(study: Any, **levels: str) -> dict[str, Any]:
    cell = {**study.cells()[0], **levels}
    return {"cell": study.cell_label(cell), "factors": cell, "followups": study.followup_mode(cell)}


def _transcript(*messages: tuple[str, str, str], **extra: Any) -> dict[str, Any]:
    out = []
    turn = 0
    for sender, kind, text in messages:
        if sender == "participant":
            turn += 1
        out.append({"from": sender, "kind": kind, "text": text, "turn": turn,
                    "produced_by": "participant" if sender == "participant" else "script"})
    return {"id": "c1-1", "messages": out, "expects": "message", "participant_id": "p123", "params": {}, **extra}


def _kinds(flags: list[dict[str, Any]]) -> set[str]:
    return {f["kind"] for f in flags}


def test_each_kind_of_flag_from_one_conversation() -> None:
    study = load_study(DEFAULT_STUDY)
    cell = _cell(study, think="high")
    clean = _transcript(("bot", "greeting", "Hello"), ("participant", "message", "My parcel was late"),
                        ("bot", "question", "When was it due?"), ("participant", "email", "[e-mail address]"),
                        ("bot", "thanks", "Thanks"), expects="done")
    clean["messages"][-1]["link"] = {"url": "https://s.example/x?pid=p123", "label": "go"}
    assert pilot_report.transcript_flags(study, cell, clean) == []

    repeated = _transcript(("bot", "greeting", "Hello"), ("participant", "message", "x"), ("bot", "question", "Q?"),
                           ("participant", "message", "y"), ("bot", "question", "Q?"), ("bot", "email_retry", "E"),
                           ("participant", "email", "z"), ("bot", "email_retry", "E"))
    assert _kinds(pilot_report.transcript_flags(study, cell, repeated)) == {"repeated_text"}

    raw = _transcript(("bot", "greeting", "Hello {participant_name}, welcome"))
    assert _kinds(pilot_report.transcript_flags(study, cell, raw)) == {"placeholder"}
    empty = _transcript(("bot", "thanks", "Thanks"), expects="done")
    empty["messages"][0]["link"] = {"url": "https://s.example/x?pid=p123&prolific=", "label": "go"}
    assert [f["message"] for f in pilot_report.transcript_flags(study, cell, empty)] == [
        "the survey link has an empty parameter 'prolific': https://s.example/x?pid=p123&prolific="]
    unjoinable = _transcript(("bot", "thanks", "Thanks"), expects="done")
    unjoinable["messages"][0]["link"] = {"url": "https://s.example/x", "label": "go"}
    assert _kinds(pilot_report.transcript_flags(study, cell, unjoinable)) == {"survey_link"}

    low = _cell(study, think="low")
    said = "The drum makes a noise like metal and then water is going out from the bottom."
    echo = _transcript(("participant", "message", said),
                       ("bot", "paraphrase", "It sounds like the drum makes a noise like metal and then water is"
                                             " going out from the bottom. Can you say more?"))
    assert _kinds(pilot_report.transcript_flags(study, low, echo)) == {"echo"}
    restated = _transcript(("participant", "message", said),
                           ("bot", "paraphrase", "So the machine started leaking after a loud noise. What next?"))
    assert pilot_report.transcript_flags(study, low, restated) == []

    fallback = _transcript(("participant", "message", "x y"), ("bot", "paraphrase", "I see. Tell me more?"))
    fallback["messages"][1]["fallback_reason"] = "timeout"
    assert _kinds(pilot_report.transcript_flags(study, low, fallback)) == {"fallback"}
    # The same paraphrase in a question cell: the catch-all reached a participant of a question cell.
    assert _kinds(pilot_report.transcript_flags(study, cell, fallback)) == {"fallback", "catch_all"}
    misfiled = {**fallback, "persona_problem": "A", "problem_type": "Other"}
    assert any("classifier misfiled it" in f["message"] for f in pilot_report.transcript_flags(study, cell, misfiled))


def test_a_factor_whose_levels_show_the_same_texts() -> None:
    study = load_study(DEFAULT_STUDY)
    differences = pilot_report.factor_differences(study)
    assert differences["feel"] == {"high vs low": ["empathy"]}
    assert "greeting" in differences["brand"]["basic vs bramble"]
    assert "followups" in differences["think"]["high vs low"]
    source = DEFAULT_STUDY.read_text().replace(FEEL_LOW_EMPTY, f'when = {{ feel = "low" }}\ntext = "{EMPATHY}"')
    broken = load_study(source=source)
    assert pilot_report.factor_differences(broken)["feel"] == {"high vs low": []}
    flags = pilot_report.study_flags(broken, [], pilot_report.factor_differences(broken), {}, {})
    assert [(f["severity"], f["kind"], f["factor"]) for f in flags] == [("error", "same_levels", "feel")]


def test_the_html_is_self_contained_and_escapes_everything() -> None:
    study = load_study(DEFAULT_STUDY)
    hostile = _transcript(("bot", "greeting", "Hi"), ("participant", "message", "<script>alert(1)</script><img src=x>"),
                          ("bot", "paraphrase", "So \"<b>bold</b>\" & more {x}"))
    report = {
        "study": {"title": "<i>T</i>", "path": "combot.toml"}, "seconds": 1.0,
        "options": {"per_cell": 1, "participant_llm": False},
        "cells": [{**_cell(study), "number": 1, "in_words": "brand: <basic>",
                   "transcripts": [{**hostile, "slot": 0, "persona": "p<1>", "persona_summary": "s&s", "player": "script"}]}],
        "differences": pilot_report.factor_differences(study),
        "flags": pilot_report.transcript_flags(study, _cell(study), hostile),
        "balance": {"per_cell": {"a": 1}, "checked": False, "ok": False, "expected": 1},
        "data": {"database": "x"},
    }
    page = pilot_report.to_html(report)
    assert "<script" not in page and "<img" not in page and "<b>bold" not in page and "<i>T" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page), "no external assets or links"
    assert "<link" not in page
    assert 'href="#t-c1-1"' in page and 'id="t-c1-1"' in page, "each flag links to its transcript"


def test_the_command_exits_non_zero_on_an_error_flag_and_writes_both_reports(
        tmp_path: Path, study_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # The run itself is stubbed here (the slow tests below run real servers): this checks the wiring.
    from combot import pilot as pilot_module

    def no_participants(study: Any, options: PilotOptions, say: Callable[[str], None]) -> dict[str, Any]:
        return pilot_report.build(study, options, [], {}, 0.1)

    monkeypatch.setattr(pilot_module, "run_pilot", no_participants)
    broken = study_file(replace={FEEL_LOW_EMPTY: f'when = {{ feel = "low" }}\ntext = "{EMPATHY}"'})
    out, as_json = tmp_path / "r.html", tmp_path / "r.json"
    result = CliRunner().invoke(cli, ["pilot", "--config", str(broken), "--out", str(out), "--json", str(as_json)])
    assert result.exit_code == 1, result.output
    assert "same_levels" in result.output and out.read_text().startswith("<!doctype html>")
    assert [(f["severity"], f["kind"], f["factor"]) for f in json.loads(as_json.read_text())["flags"]] == [
        ("error", "same_levels", "feel")]
    clean = CliRunner().invoke(cli, ["pilot", "--config", str(study_file(name="ok.toml")), "--out", str(out)])
    assert clean.exit_code == 0, clean.output


# --- real pilots of a real server ---------------------------------------------------------------------

def _pilot(study_path: Path, **options: Any) -> dict[str, Any]:
    study = load_study(study_path)
    return run_pilot(study, PilotOptions(workers=2, config_path=str(study_path), **options), say=lambda _line: None)


def _flag_kinds(report: dict[str, Any]) -> set[tuple[str, str]]:
    return {(f["severity"], f["kind"]) for f in report["flags"]}


@pytest.mark.slow
def test_the_default_study_pilots_clean_with_balance_and_a_documented_export(tmp_path: Path) -> None:
    out, as_json = tmp_path / "report.html", tmp_path / "report.json"
    before = {p.name for p in Path.cwd().iterdir()}
    result = CliRunner().invoke(cli, ["pilot", "--per-cell", "2", "--out", str(out), "--json", str(as_json)])
    assert result.exit_code == 0, result.output
    report = json.loads(as_json.read_text())
    assert [f for f in report["flags"] if f["severity"] == "error"] == []
    assert set(report) >= {"cells", "flags", "balance"}
    assert len(report["cells"]) == 8
    for cell in report["cells"]:
        assert set(cell) >= {"cell", "factors", "transcripts"}
        assert [t["persona"] for t in cell["transcripts"]] == [PERSONAS[0].key, PERSONAS[1].key]
        for transcript in cell["transcripts"]:
            assert transcript["status"] == "finished" and transcript["error"] is None
            bots = [m for m in transcript["messages"] if m["from"] == "bot"]
            assert all(m["produced_by"] in ("script", "template") for m in bots)
            # Each reply carries its timing: computed, and shown after its designed delay.
            assert all(m["shown_ms"] >= m["compute_ms"] >= 0 for m in bots if m["kind"] != "greeting")
            thanks = [m for m in bots if m["kind"] == "thanks"]
            assert thanks and transcript["participant_id"] in thanks[0]["link"]["url"]
        empathy = [m for t in cell["transcripts"] for m in t["messages"] if m["kind"] == "empathy"]
        assert bool(empathy) == (cell["factors"]["feel"] == "high")
    # 2 x 8 participants, balanced: 2 in every cell, read from the pilot's own database.
    assert report["balance"]["checked"] and report["balance"]["ok"]
    assert set(report["balance"]["per_cell"].values()) == {2}
    assert report["data"]["stored"]["messages_missing"] == 0
    assert report["data"]["stored"]["messages_expected"] > 16 * 8
    files = report["data"]["export"]["files"]
    assert files["participants"]["rows"] == 16 and all(not f["undocumented"] for f in files.values())
    assert "shown after" in out.read_text() and "reply timing: none" in out.read_text()
    assert "Side by side" in out.read_text() and "brand: bramble · think: low · feel: high" in out.read_text()
    assert {p.name for p in Path.cwd().iterdir()} == before, "nothing written beside the study"


@pytest.fixture(scope="module")
def baseline_report() -> dict[str, Any]:
    """The default study with the terse persona: the reference each broken study is compared with."""
    return _pilot(DEFAULT_STUDY, per_cell=1, personas=("terse-cashier",))


@pytest.fixture
def baseline(baseline_report: dict[str, Any]) -> set[tuple[str, str]]:
    return _flag_kinds(baseline_report)


BROKEN: dict[str, tuple[dict[str, str], str]] = {
    "repeated_text": ({"Thank you for your answers. To finish, please type your e-mail address so we can follow up on"
                       " your case.": EMPATHY}, ""),
    "survey_link": ({"SV_0000000000?pid={participant_id}": "SV_0000000000"}, ""),
    "fallback": ({'base_url = ""': 'base_url = "http://127.0.0.1:9/v1"'}, ""),
    "catch_all": ({"threshold = 0.4": "threshold = 0.999"}, ""),
    "same_levels": ({FEEL_LOW_EMPTY: f'when = {{ feel = "low" }}\ntext = "{EMPATHY}"'}, ""),
    "placeholder": ({"SV_0000000000?pid={participant_id}": "SV_0000000000?pid={participant_id}&pp={PROLIFIC_ID}"}, ""),
}
SEVERITY = {"repeated_text": "warning", "survey_link": "error", "fallback": "warning", "catch_all": "warning",
            "same_levels": "error", "placeholder": "error"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_study_broken_in_one_way_gets_exactly_that_flag(kind: str, baseline: set[tuple[str, str]],
                                                         study_file: Callable[..., Path]) -> None:
    replace, append = BROKEN[kind]
    path = study_file(replace=replace, append=append)
    try:
        load_study(path)
    except ConfigError as error:
        # `check` now refuses this mistake outright: even better than a pilot flag.
        assert kind == "placeholder" and "PROLIFIC_ID" in str(error)
        return
    report = _pilot(path, per_cell=1, personas=("terse-cashier",))
    assert (SEVERITY[kind], kind) not in baseline
    assert _flag_kinds(report) - baseline == {(SEVERITY[kind], kind)}
    flagged = [f for f in report["flags"] if f["kind"] == kind]
    linked = {t["id"] for c in report["cells"] for t in c["transcripts"]}
    assert all(set(f["transcripts"]) <= linked and f["transcripts"] for f in flagged)


@pytest.mark.slow
def test_echo_is_flagged_for_a_participant_the_paraphraser_parrots(baseline_report: dict[str, Any]) -> None:
    # The offline paraphraser reflects words back, so whether it echoes depends on what the participant
    # wrote: a persona writing about things in the third person is echoed, a first-person one is not.
    parroted = _pilot(DEFAULT_STUDY, per_cell=1, personas=("washing-machine-non-native",))
    echoed_cells = {f["cell"] for f in parroted["flags"] if f["kind"] == "echo"}
    low = {c["cell"] for c in parroted["cells"] if c["factors"]["think"] == "low"}
    assert low <= echoed_cells
    assert not any(f["kind"] == "echo" for f in baseline_report["flags"])


@pytest.mark.slow
def test_participants_played_by_the_fake_llm_with_consent(study_file: Callable[..., Path]) -> None:
    fake = start_fake_llm()
    try:
        path = study_file(replace={'base_url = ""': f'base_url = "{fake.url}"', "enabled = false": "enabled = true"})
        report = _pilot(path, per_cell=1, participant_llm=True, personas=("hostile-broadband",))
    finally:
        fake.stop()
    assert report["balance"]["ok"]
    for cell in report["cells"]:
        (transcript,) = cell["transcripts"]
        persona = next(p for p in PERSONAS if p.key == transcript["persona"])
        story = [*persona.openings, *persona.answers.values(), *persona.more]
        assert transcript["player"] == "llm" and transcript["status"] == "finished"
        assert transcript["player_fallbacks"] == 0  # the hostile one's <b> and its injection went through
        sent = [m["text"] for m in transcript["messages"] if m["from"] == "participant" and m["kind"] == "message"]
        # The persona was played: every message comes from its own story, in its order.
        assert sent == [story[i % len(story)] for i in range(len(sent))]
        assert not any(PLAYER_MARKER in m["text"] or "Facts you can tell" in m["text"] for m in transcript["messages"])
    assert not any(f["severity"] == "error" for f in report["flags"])


@pytest.mark.slow
def test_a_running_study_piloted_over_its_url(live_server: Callable[..., Any], study_file: Callable[..., Path]) -> None:
    token = "pilot-test-admin-token-0123456789"
    path = study_file(replace={"enabled = false": "enabled = true", "email_skip_words = []": 'email_skip_words = ["skip"]'})
    server = live_server(config=path, env={**os.environ, "COMBOT_ADMIN_TOKEN": token})
    study = load_study(path)
    with pytest.raises(PilotError, match="403"):
        run_pilot(study, PilotOptions(url=server.url, admin_token="not-the-token", per_cell=1), say=lambda _l: None)
    with pytest.raises(PilotError, match="admin token"):
        run_pilot(study, PilotOptions(url=server.url, per_cell=1), say=lambda _l: None)
    report = run_pilot(study, PilotOptions(url=server.url, admin_token=token, per_cell=1,
                                           personas=("double-charge-decliner",)), say=lambda _l: None)
    assert not [f for f in report["flags"] if f["severity"] == "error"]
    for cell in report["cells"]:
        (transcript,) = cell["transcripts"]  # synthetic arrivals are balanced among themselves
        assert transcript["status"] == "finished" and transcript["persona"] == "double-charge-decliner"
        # It declines the e-mail address, as this study allows: stored as a marker only.
        assert [m["text"] for m in transcript["messages"] if m["kind"] == "email"] == ["[no e-mail address given]"]
        bots = [m for m in transcript["messages"] if m["from"] == "bot"]
        assert bots[0]["kind"] == "greeting" and all(m["produced_by"] in ("script", "template") for m in bots)
        assert any(m.get("link") for m in bots)
    assert report["data"]["stored"]["messages_missing"] == 0 and report["data"]["export"]["ok"]
    conn = sqlite3.connect(server.database)
    try:
        synthetic = conn.execute("SELECT count(*) FROM participants WHERE synthetic = 1").fetchone()[0]
        real = conn.execute("SELECT count(*) FROM participants WHERE synthetic = 0").fetchone()[0]
    finally:
        conn.close()
    assert (synthetic, real) == (8, 0)
