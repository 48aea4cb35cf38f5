"""Export: columns, codebook, anonymisation, spreadsheet safety, round trips and bounded memory."""

from __future__ import annotations

import csv
import io
import json
import random
import sqlite3
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from combot import engine, export, store
from combot.assignment import choose_cell
from combot.cli import cli
from combot.study import Study, load_study
from tests.conftest import DEFAULT_STUDY

TRICKY = [
    "=HYPERLINK(\"http://evil.example\",\"click\")",
    "+1 555 0100 was the number they gave me",
    "-5 stars, would not buy again",
    "@everyone look at this",
    "\tindented with a tab",
    "\rstarts with a carriage return",
    "line one\nline two, \"quoted\", and a comma\r\nline three",
    "Ünïcödé and emoji 🙂 and a trailing backslash \\",
]


def add_participant(conn: sqlite3.Connection, study: Study, pid: str, texts: list[str], *, email: str | None = None,
                    params: Mapping[str, str] | None = None, consented: bool = False) -> None:
    """A participant stored through the store's own functions, as the web layer does."""
    rng = random.Random(pid)

    def greet(factors: Mapping[str, str]) -> tuple[dict[str, Any], list[store.NewMessage]]:
        state, replies = engine.start(study, factors)
        return state.to_dict(), [store.NewMessage("bot", r.kind, r.text, r.produced_by) for r in replies]

    row, _ = store.create_participant(conn, participant_id=pid, token="tok-" + pid,
                                      choose_cell=lambda counts: choose_cell(study, counts, rng), greet=greet,
                                      url_params=params, platform_id=(params or {}).get("PROLIFIC_PID"),
                                      user_agent="TestBrowser/1.0", consented=consented)
    for number, text in enumerate(texts, start=1):
        store.record_turn(conn, store.Turn(
            participant_id=pid, expected_version=number - 1, turn=number,
            incoming=store.NewMessage("participant", "message", text, client_message_id=f"c{number}"),
            replies=[store.NewMessage("bot", "paraphrase", f"You said: {text}", "template", latency_ms=40 + number)],
            state={"stage": "chat", "turn": number}, status="started",
            problem_type="B" if number == 1 else None,
            scores={"A": 0.1, "B": 0.7, "C": 0.1, "Other": 0.1} if number == 1 else None))
    if email:
        n = len(texts) + 1
        store.record_turn(conn, store.Turn(
            participant_id=pid, expected_version=n - 1, turn=n,
            incoming=store.NewMessage("participant", "email", "[e-mail address]"),
            replies=[store.NewMessage("bot", "thanks", "Thank you.", "script", latency_ms=5)],
            state={"stage": "done", "turn": len(texts)}, status="finished", email=email))


@pytest.fixture
def study() -> Study:
    return load_study(DEFAULT_STUDY, environ={})


@pytest.fixture
def filled(tmp_path: Path, study: Study) -> Callable[[], sqlite3.Connection]:
    def make() -> sqlite3.Connection:
        conn = store.connect(tmp_path / "study.db")
        add_participant(conn, study, "p1", TRICKY, email="=evil@example.com",
                        params={"PROLIFIC_PID": "pp-1", "STUDY_ID": "s-1", "SESSION_ID": "=cmd|' /C calc'!A0"},
                        consented=True)
        add_participant(conn, study, "p2", ["My parcel never arrived."])
        store.record_decline(conn, participant_id="p3", token="tok-p3", url_params={"PROLIFIC_PID": "pp-3"},
                             platform_id="pp-3")
        return conn
    return make


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


def test_participants_have_one_row_each_with_factors_scores_and_times(filled: Callable[[], sqlite3.Connection],
                                                                      study: Study, tmp_path: Path) -> None:
    counts = export.export_to_dir(filled(), study, tmp_path / "out")
    assert counts == {"participants": 3, "messages": 2 * len(TRICKY) + 2 + 1 + 2 + 1, "chain": counts["chain"],
                      "personal": 3}
    rows = {r["participant_id"]: r for r in read_csv(tmp_path / "out" / "participants.csv")}
    assert list(rows["p1"]) == ["participant_id", "cell", "cell_number", "brand", "think", "feel", "problem_type",
                                "score_A", "score_B", "score_C", "score_Other", "described_experience", "reprompts",
                                "status", "consent", "started_at",
                                "finished_at", "last_active_at", "seconds_spent", "turns", "assignment",
                                "study_version"]
    one = rows["p1"]
    assert one["cell"] == "-".join(one[f] for f in ("brand", "think", "feel"))
    assert 1 <= int(one["cell_number"]) <= 8
    assert one["problem_type"] == "B" and float(one["score_B"]) == 0.7
    assert one["status"] == "finished" and one["consent"] == "agreed"
    assert one["started_at"].endswith("Z") and "T" in one["started_at"] and one["finished_at"].endswith("Z")
    assert float(one["seconds_spent"]) >= 0 and one["turns"] == str(len(TRICKY) + 1)
    assert one["assignment"] == "balanced"
    assert rows["p2"]["status"] == "started" and rows["p2"]["finished_at"] == "" and rows["p2"]["consent"] == "not asked"
    declined = rows["p3"]
    assert declined["status"] == "declined" and declined["cell"] == "" and declined["cell_number"] == ""
    assert declined["consent"] == "declined" and declined["seconds_spent"] == ""
    # No personal data outside personal.csv.
    text = (tmp_path / "out" / "participants.csv").read_text() + (tmp_path / "out" / "messages.csv").read_text()
    for secret in ("pp-1", "pp-3", "evil@example.com", "TestBrowser"):
        assert secret not in text


def test_messages_round_trip_through_csv_with_formulas_neutralised(filled: Callable[[], sqlite3.Connection],
                                                                  study: Study, tmp_path: Path) -> None:
    export.export_to_dir(filled(), study, tmp_path / "out")
    raw = (tmp_path / "out" / "messages.csv").read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf"), "no byte-order mark"
    rows = read_csv(tmp_path / "out" / "messages.csv")
    assert list(rows[0]) == list(export.Layout(study).messages)
    sent = [r["text"] for r in rows if r["participant_id"] == "p1" and r["kind"] == "message"]
    expected = ["'" + t if t[0] in "=+-@\t\r" else t for t in TRICKY]
    assert sent == expected
    assert "line one\nline two, \"quoted\", and a comma\r\nline three" in sent
    bot = [r for r in rows if r["participant_id"] == "p1" and r["sender"] == "bot"]
    assert bot[0]["turn"] == "0" and bot[0]["kind"] == "greeting" and bot[0]["latency_ms"] == ""
    assert bot[1]["produced_by"] == "template" and bot[1]["latency_ms"] == "41"
    email = [r for r in rows if r["kind"] == "email"]
    assert [r["text"] for r in email] == ["[e-mail address]"]
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), value


def test_the_csv_reads_back_in_pandas_when_available(filled: Callable[[], sqlite3.Connection], study: Study,
                                                     tmp_path: Path) -> None:
    pandas = pytest.importorskip("pandas")
    export.export_to_dir(filled(), study, tmp_path / "out")
    frame = pandas.read_csv(tmp_path / "out" / "messages.csv", keep_default_na=False)
    assert "line one\nline two, \"quoted\", and a comma\r\nline three" in list(frame["text"])


def test_personal_data_is_separate_and_left_out_when_anonymised(filled: Callable[[], sqlite3.Connection],
                                                               study: Study, tmp_path: Path) -> None:
    conn = filled()
    export.export_to_dir(conn, study, tmp_path / "full")
    personal = {r["participant_id"]: r for r in read_csv(tmp_path / "full" / "personal.csv")}
    assert list(personal["p1"]) == ["participant_id", "email", "platform_id", "PROLIFIC_PID", "STUDY_ID",
                                    "SESSION_ID", "participant_label", "user_agent"]
    assert personal["p1"]["email"] == "'=evil@example.com"
    assert personal["p1"]["SESSION_ID"] == "'=cmd|' /C calc'!A0"
    assert personal["p1"]["PROLIFIC_PID"] == "pp-1" and personal["p3"]["platform_id"] == "pp-3"
    assert personal["p2"]["email"] == "" and personal["p1"]["user_agent"] == "TestBrowser/1.0"

    counts = export.export_to_dir(conn, study, tmp_path / "anon", anonymise=True)
    assert "personal" not in counts
    files = sorted(p.name for p in (tmp_path / "anon").iterdir())
    assert files == ["MANIFEST.json", "chain.csv", "codebook.md", "messages.csv", "participants.csv"]
    everything = "".join(p.read_text() for p in (tmp_path / "anon").iterdir())
    for secret in ("pp-1", "pp-3", "s-1", "evil@example.com", "TestBrowser"):
        assert secret not in everything
    # A folder that still holds personal data is refused rather than left looking anonymous.
    with pytest.raises(export.ExportError, match="personal.csv"):
        export.export_to_dir(conn, study, tmp_path / "full", anonymise=True)


def test_the_codebook_describes_every_column_and_value(filled: Callable[[], sqlite3.Connection], study: Study,
                                                       tmp_path: Path) -> None:
    export.export_to_dir(filled(), study, tmp_path / "out")
    book = (tmp_path / "out" / "codebook.md").read_text()
    for name in ("participants", "messages", "personal", "chain"):
        with open(tmp_path / "out" / f"{name}.csv", encoding="utf-8", newline="") as stream:
            for column in next(csv.reader(stream)):
                assert f"`{column}`" in book, column
    for value in ("`finished`", "`declined`", "`started`", "`greeting`", "`paraphrase`", "`template`",
                  "`basic-high-high`", "`A`", "`Other`", "`agreed`", "`not asked`"):
        assert value in book, value
    assert "byte-order mark" in book and "UTF-8" in book


def test_jsonl_keeps_values_as_stored(filled: Callable[[], sqlite3.Connection], study: Study, tmp_path: Path) -> None:
    export.export_to_dir(filled(), study, tmp_path / "out", fmt="jsonl")
    lines = (tmp_path / "out" / "messages.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    texts = [r["text"] for r in rows if r["participant_id"] == "p1" and r["kind"] == "message"]
    assert texts == TRICKY
    participants = [json.loads(line) for line in (tmp_path / "out" / "participants.jsonl").read_text().splitlines()]
    assert isinstance(participants[0]["score_B"], float) and participants[0]["cell_number"] >= 1
    assert (tmp_path / "out" / "personal.jsonl").exists() and (tmp_path / "out" / "codebook.md").exists()


def test_zip_holds_the_same_files(filled: Callable[[], sqlite3.Connection], study: Study, tmp_path: Path) -> None:
    target = io.BytesIO()
    export.export_to_zip(filled(), study, target, anonymise=True)
    with zipfile.ZipFile(target) as archive:
        assert sorted(archive.namelist()) == ["MANIFEST.json", "chain.csv", "codebook.md", "messages.csv",
                                              "participants.csv"]
        rows = list(csv.DictReader(io.StringIO(archive.read("participants.csv").decode("utf-8"), newline="")))
    assert len(rows) == 3


def test_the_export_command(filled: Callable[[], sqlite3.Connection], tmp_path: Path) -> None:
    filled().close()
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "--out", str(tmp_path / "cli"), "--database", str(tmp_path / "study.db"),
                                 "--anonymise"])
    assert result.exit_code == 0, result.output
    assert "participants.csv" in result.output and "personal" not in sorted(p.name for p in (tmp_path / "cli").iterdir())
    result = runner.invoke(cli, ["export", "--out", str(tmp_path / "j"), "--database", str(tmp_path / "study.db"),
                                 "--format", "jsonl"])
    assert result.exit_code == 0 and (tmp_path / "j" / "personal.jsonl").exists()
    missing = runner.invoke(cli, ["export", "--out", str(tmp_path / "x"), "--database", str(tmp_path / "nope.db")])
    assert missing.exit_code != 0 and "no database" in missing.output


def test_100k_messages_export_in_bounded_memory(tmp_path: Path, study: Study) -> None:
    conn = store.connect(tmp_path / "big.db")
    conn.execute("PRAGMA synchronous = OFF")  # only to fill the test database quickly
    cells = study.cells()
    participants, per = 2000, 50
    with store.transaction(conn):
        for n in range(participants):
            cell = cells[n % len(cells)]
            pid = f"p{n:06d}"
            conn.execute(
                "INSERT INTO participants (id, token, cell, cell_number, factors, assignment, state, version, status,"
                " problem_type, scores, turns, created_at, updated_at, url_params) VALUES"
                " (?, ?, ?, ?, ?, 'balanced', '{}', 0, 'started', 'A', ?, ?, ?, ?, '{}')",
                (pid, "t" + pid, study.cell_label(cell), study.cell_number(cell), json.dumps(cell),
                 json.dumps({"A": 0.5, "B": 0.2, "C": 0.2, "Other": 0.1}), per // 2, store.now(), store.now()))
            conn.executemany(
                "INSERT INTO messages (participant_id, turn, sender, kind, text, produced_by, latency_ms, created_at)"
                " VALUES (?, ?, ?, 'message', ?, 'participant', 12, ?)",
                [(pid, i // 2, "participant" if i % 2 else "bot", f"message {i} of {pid}: " + "blah " * 30,
                  store.now()) for i in range(per)])
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 100_000

    tracemalloc.start()
    try:
        counts = export.export_to_dir(conn, study, tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts["messages"] == 100_000 and counts["participants"] == participants
    size = (tmp_path / "out" / "messages.csv").stat().st_size
    assert size > 15_000_000
    # Holding the rows (or the file) would take tens of megabytes; streaming stays near a few hundred KB.
    assert peak < 1_000_000, peak


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40), min_size=1, max_size=6))
def test_any_text_survives_a_csv_round_trip_neutralised_and_only_then(texts: list[str]) -> None:
    buffer = io.StringIO(newline="")
    export.write_rows(buffer, "csv", ["a", "b"], [{"a": t, "b": len(t)} for t in texts])
    back = list(csv.DictReader(io.StringIO(buffer.getvalue(), newline="")))
    assert [r["a"] for r in back] == [("'" + t if t.startswith(("=", "+", "-", "@", "\t", "\r")) else t) for t in texts]
    assert [r["b"] for r in back] == [str(len(t)) for t in texts]


def test_anonymise_replaces_addresses_and_phone_numbers_typed_into_the_chat(study: Study, tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "study.db")
    add_participant(conn, study, "p1", ["They broke my kettle. Call me on +44 20 7946 0958 or mail jo@home.example.org",
                                       "It arrived on 2024-05-01 and cost 45.99"], email="jo@home.example.org")
    conn.close()
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "--anonymise", "--database", str(tmp_path / "study.db"),
                                 "--out", str(tmp_path / "anon")])
    assert result.exit_code == 0, result.output
    texts = [r["text"] for r in read_csv(tmp_path / "anon" / "messages.csv")]
    assert "They broke my kettle. Call me on [phone] or mail [email]" in texts
    assert "It arrived on 2024-05-01 and cost 45.99" in texts
    everything = "".join(p.read_text() for p in (tmp_path / "anon").rglob("*") if p.is_file())
    assert "7946" not in everything and "jo@home" not in everything
    assert "`[email]`" in (tmp_path / "anon" / "codebook.md").read_text()
    result = runner.invoke(cli, ["export", "--database", str(tmp_path / "study.db"), "--out", str(tmp_path / "full")])
    assert any("+44 20 7946 0958" in r["text"] for r in read_csv(tmp_path / "full" / "messages.csv"))
