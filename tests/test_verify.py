"""`combot verify` on a database: untouched data verifies, each kind of tampering is found and named."""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any, Callable, Mapping

import pytest

from click.testing import CliRunner

from combot import __version__, export, store, verify
from combot.cli import cli
from combot.errors import CollectionClosed
from combot.store import NewMessage, Turn
from combot.study import load_study
from tests.conftest import DEFAULT_STUDY, LiveServer, walk_conversation


STUDY = load_study(DEFAULT_STUDY, environ={})


def _choose(n: int = 0) -> Callable[[Mapping[str, int]], tuple[str, int, dict[str, str], str]]:
    cell = STUDY.cells()[n % len(STUDY.cells())]
    return lambda counts: (STUDY.cell_label(cell), STUDY.cell_number(cell), cell, "balanced")


def _greet(factors: Mapping[str, str]) -> tuple[dict[str, Any], list[NewMessage]]:
    return {"stage": "chat"}, [NewMessage("bot", "greeting", "Hello", "script")]


def _turn(pid: str, version: int, text: str, status: str = "started", classify: bool = False) -> Turn:
    return Turn(participant_id=pid, expected_version=version, turn=version + 1,
                incoming=NewMessage("participant", "message", text, client_message_id=f"c{version}", stage="chat",
                                    expects="message", scores={"A": 0.75, "B": 0.25} if classify else None),
                replies=[NewMessage("bot", "question", f"about '{text}'?", "script", latency_ms=4, compute_ms=4,
                                    shown_ms=1500)],
                state={"stage": "chat"}, status=status, problem_type="A" if classify else None,
                scores={"A": 0.75, "B": 0.25} if classify else None, described_experience=True if classify else None)


@pytest.fixture
def study_db(tmp_path: Path) -> Callable[..., Path]:
    """study_db(participants=3) -> a database with finished, started and declined participants."""
    def make(participants: int = 3, name: str = "study.db") -> Path:
        path = tmp_path / name
        conn = store.connect(path)
        store.record_study_version(conn, version="v1", text="[study]\n", combot_version=__version__,
                                   head_sha256="0" * 64, encoder_sha256="0" * 64)
        for n in range(participants):
            pid = f"p{n:02d}"
            store.create_participant(conn, participant_id=pid, token=f"tok-{pid}", choose_cell=_choose(n),
                                     greet=_greet, consented=n % 2 == 0, study_version="v1")
            store.record_turn(conn, _turn(pid, 0, f"my kettle broke ({n})", classify=True))
            store.record_turn(conn, _turn(pid, 1, "=SUM(A1) it was bad, call me on 0176 1234 5678" if n == 1
                                          else "=SUM(A1) it was bad", status="finished" if n % 2 else "started"))
        store.record_decline(conn, participant_id="pz", token="tok-pz")
        store.create_participant(conn, participant_id="s1", token="tok-s1", choose_cell=_choose(), greet=_greet,
                                 synthetic=True)
        store.record_turn(conn, _turn("s1", 0, "a bench participant", classify=True))
        conn.close()
        return path
    return make


def _tamper(path: Path, sql: str, *params: Any) -> None:
    conn = sqlite3.connect(path)
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def test_untouched_data_verifies(study_db: Callable[..., Path]) -> None:
    path = study_db()
    report = verify.verify_database(path)
    assert report.ok, report.problems
    assert (report.participants, report.messages) == (4, 15)  # the synthetic participant is not study data
    assert "1 synthetic" in " ".join(report.notes)
    conn = store.connect(path)
    assert report.digest == store.study_digest(conn)["digest"]
    assert verify.verify_database(path, expected_digest=report.digest).ok
    assert not verify.verify_database(path, expected_digest="00" * 32).ok


def test_every_row_carries_its_link_and_each_participant_its_head(study_db: Callable[..., Path]) -> None:
    conn = store.connect(study_db(1))
    participant = conn.execute("SELECT * FROM participants WHERE id = 'p00'").fetchone()
    links = [(0, "participant", participant["hash"])]
    links += [(r["seq"], "status", r["hash"]) for r in conn.execute("SELECT * FROM status_changes WHERE participant_id"
                                                                    " = 'p00'")]
    links += [(r["seq"], "message", r["hash"]) for r in conn.execute("SELECT * FROM messages WHERE participant_id"
                                                                     " = 'p00'")]
    # participant, status (started), greeting, message + reply, status (classified), message + reply
    assert [kind for _, kind, _ in sorted(links)] == ["participant", "status", "message", "message", "message",
                                                      "status", "message", "message"]
    assert participant["chain_length"] == 8 and participant["chain_head"] == max(links)[2]
    changes = conn.execute("SELECT status, problem_type, scores FROM status_changes WHERE participant_id = 'p00'"
                           " ORDER BY seq").fetchall()
    assert [tuple(r) for r in changes] == [("started", None, None), ("started", "A", "A:0.75,B:0.25")]


@pytest.mark.parametrize("sql, params, where", [
    ("UPDATE messages SET text = replace(text, 'kettle', 'kettlE') WHERE participant_id = 'p01'", (),
     "participant p01, message"),
    ("DELETE FROM messages WHERE id = (SELECT min(id) FROM messages WHERE participant_id = 'p01' AND turn = 1)", (),
     "participant p01, message"),
    ("UPDATE participants SET cell = 'basic-high-low', cell_number = 2 WHERE id = 'p02'", (),
     "participant p02, participant row"),
    ("UPDATE messages SET seq = CASE seq WHEN 3 THEN 4 ELSE 3 END WHERE participant_id = 'p00' AND seq IN (3, 4)", (),
     "participant p00, message"),
    ("UPDATE participants SET status = 'finished' WHERE id = 'p00'", (), "participant p00, participant row"),
    ("UPDATE status_changes SET problem_type = 'B' WHERE participant_id = 'p01' AND problem_type = 'A'", (),
     "participant p01, status change"),
    ("DELETE FROM messages WHERE id = (SELECT max(id) FROM messages WHERE participant_id = 'p02')", (),
     "participant p02, participant row"),
    ("UPDATE participants SET consented_at = NULL WHERE id = 'p00'", (), "participant p00, participant row"),
    ("UPDATE messages SET stage = 'email' WHERE participant_id = 'p01' AND stage = 'chat'", (),
     "participant p01, message"),
    ("UPDATE participants SET described_experience = 0 WHERE id = 'p02'", (), "participant p02, participant row"),
    ("UPDATE participants SET synthetic = 1 WHERE id = 'p02'", (), "participant p02, participant row"),
    ("UPDATE messages SET shown_ms = 900 WHERE participant_id = 'p02' AND shown_ms = 1500", (),
     "participant p02, message"),
    ("UPDATE participants SET study_version = 'other' WHERE id = 'p02'", (), "participant p02, participant row"),
    ("INSERT INTO messages (participant_id, turn, sender, kind, text, created_at) VALUES ('p01', 9, 'bot',"
     " 'question', 'added later', '2026-01-01T00:00:00.000Z')", (), "participant p01, message"),
])
def test_tampering_is_found_and_named(study_db: Callable[..., Path], sql: str, params: tuple[Any, ...],
                                      where: str) -> None:
    path = study_db()
    _tamper(path, sql, *params)
    report = verify.verify_database(path)
    assert not report.ok
    assert str(report.problems[0]).startswith(where), report.problems


def test_swapping_two_messages_contents_is_found(study_db: Callable[..., Path]) -> None:
    path = study_db()
    conn = sqlite3.connect(path)
    a, b = conn.execute("SELECT id, text FROM messages WHERE participant_id = 'p00' AND sender = 'participant'"
                        " ORDER BY id").fetchall()
    conn.execute("UPDATE messages SET text = ? WHERE id = ?", (b[1], a[0]))
    conn.execute("UPDATE messages SET text = ? WHERE id = ?", (a[1], b[0]))
    conn.commit()
    report = verify.verify_database(path)
    assert str(report.problems[0]) .startswith(f"participant p00, message {a[0]}:")


def test_a_rehashed_forgery_passes_the_chain_but_not_the_published_digest(study_db: Callable[..., Path]) -> None:
    path = study_db()
    published = verify.verify_database(path).digest
    conn = store.connect(path)
    conn.execute("UPDATE messages SET text = 'forged' WHERE id = 3")
    # Recompute every hash the way the upgrade does: only a digest kept elsewhere shows it.
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(store.CHAIN_SCHEMA - 1),))
    for table in ("status_changes", "digests"):
        conn.execute(f"DROP TABLE {table}")
    for table, column in (("participants", "hash"), ("participants", "chain_head"),
                          ("participants", "chain_length"), ("messages", "seq"), ("messages", "hash")):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    conn.close()
    store.connect(path).close()
    assert verify.verify_database(path).ok
    report = verify.verify_database(path, expected_digest=published)
    assert [p.row for p in report.problems] == ["study digest"]


def test_a_database_from_before_the_chain_gets_its_chains_on_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    for step in store.MIGRATIONS[:store.CHAIN_SCHEMA - 1]:
        step(db)
    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(store.CHAIN_SCHEMA - 1),))
    conn.execute("INSERT INTO participants (id, token, cell, cell_number, factors, assignment, state, version, status,"
                  " problem_type, scores, turns, created_at, updated_at, finished_at) VALUES ('p1', 't1', 'a-b', 1,"
                  " '{}', 'random', '{}', 1, 'finished', 'B', '{\"A\": 0.1, \"B\": 0.9}', 1, '2026-01-01T00:00:00.000Z',"
                  " '2026-01-01T00:01:00.000Z', '2026-01-01T00:01:00.000Z')")
    for n, (sender, text) in enumerate([("bot", "Hi"), ("participant", "late parcel"), ("bot", "Thanks")]):
        conn.execute("INSERT INTO messages (participant_id, turn, sender, kind, text, created_at) VALUES"
                     " ('p1', ?, ?, 'x', ?, '2026-01-01T00:00:00.000Z')", (min(n, 1), sender, text))
    conn.close()

    assert not verify.verify_database(path).ok  # not upgraded yet: says so
    upgraded = store.connect(path)
    since = upgraded.execute("SELECT value FROM meta WHERE key = 'chain_since'").fetchone()[0]
    assert "1 participants and 3 messages" in upgraded.execute(
        "SELECT value FROM meta WHERE key = 'chain_backfilled'").fetchone()[0]
    assert [tuple(r) for r in upgraded.execute("SELECT status, problem_type, scores, at FROM status_changes")] == [
        ("finished", "B", "A:0.1,B:0.9", "2026-01-01T00:01:00.000Z")]
    upgraded.close()
    report = verify.verify_database(path)
    assert report.ok and (report.participants, report.messages) == (1, 3)
    assert f"since {since}" in report.notes[0]
    # Upgrading again computes nothing twice.
    store.connect(path).close()
    assert verify.verify_database(path).digest == report.digest


def test_closing_records_the_digest_and_refuses_new_participants_and_messages(study_db: Callable[..., Path]) -> None:
    path = study_db(2)
    conn = store.connect(path)
    store.create_participant(conn, participant_id="q1", token="tok-q1", choose_cell=_choose(), greet=_greet,
                             platform_id="PLAT")
    closed = store.close_collection(conn)
    assert closed["closing_digest"] == closed["digest"] == verify.verify_database(path).digest
    assert store.close_collection(conn)["closed_at"] == closed["closed_at"]  # a second close changes nothing
    with pytest.raises(CollectionClosed):
        store.create_participant(conn, participant_id="p9", token="tok-p9", choose_cell=_choose(), greet=_greet)
    with pytest.raises(CollectionClosed):
        store.record_turn(conn, _turn("p00", 2, "one more"))
    with pytest.raises(CollectionClosed):
        store.record_decline(conn, participant_id="p8", token="tok-p8")
    # A returning participant still gets their session back (read-only).
    row, created = store.create_participant(conn, participant_id="q2", token="tok-q2", choose_cell=_choose(),
                                            greet=_greet, platform_id="PLAT")
    assert (row["id"], created) == ("q1", False)
    assert conn.execute("SELECT count(*) FROM participants").fetchone()[0] == 5
    conn.close()
    assert verify.verify_database(path).digest == closed["closing_digest"]


def test_group_commit_from_many_processes_keeps_every_chain_whole(tmp_path: Path) -> None:
    import multiprocessing

    path = tmp_path / "many.db"
    store.connect(path).close()
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        pool.starmap(_chatter, [(str(path), worker) for worker in range(4)])
    report = verify.verify_database(path)
    assert report.ok, report.problems
    assert (report.participants, report.messages) == (16, 16 * 7)


def _chatter(path: str, worker: int) -> None:
    import asyncio

    async def run() -> None:
        handle = store.Store(path)
        await handle.open()
        try:
            pids = [f"w{worker}-{n}" for n in range(4)]
            await asyncio.gather(*(handle.run(store.create_participant, participant_id=pid, token="t" + pid,
                                              choose_cell=_choose(), greet=_greet) for pid in pids))
            for version in range(3):
                await asyncio.gather(*(handle.run(store.record_turn, _turn(pid, version, f"{pid} says {version}",
                                                                           classify=version == 0)) for pid in pids))
        finally:
            await handle.close()

    asyncio.run(run())


# --- an export folder -----------------------------------------------------------------------------

@pytest.fixture
def exported(study_db: Callable[..., Path], tmp_path: Path) -> Callable[..., Path]:
    """exported(fmt, anonymise) -> an export folder of a fresh study database."""
    def make(fmt: str = "csv", anonymise: bool = False) -> Path:
        name = f"{fmt}-{'anon' if anonymise else 'full'}"
        conn = store.connect(study_db(name=f"{name}.db"))
        export.export_to_dir(conn, STUDY, tmp_path / name, fmt=fmt, anonymise=anonymise)
        conn.close()
        return tmp_path / name
    return make


def _rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as stream:
        return list(csv.reader(stream))


def _write(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as stream:
        csv.writer(stream, lineterminator="\r\n").writerows(rows)


@pytest.mark.parametrize("fmt, anonymise", [("csv", False), ("jsonl", False), ("csv", True)])
def test_an_untouched_export_verifies_against_the_database_digest(exported: Callable[..., Path], fmt: str,
                                                                   anonymise: bool) -> None:
    folder = exported(fmt, anonymise)
    database = folder.parent / f"{folder.name}.db"
    report = verify.verify_export(folder)
    assert report.ok, report.problems
    assert report.digest == verify.verify_database(database).digest
    assert (report.participants, report.messages) == (4, 15)
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["combot_version"] == __version__ and manifest["study_versions"] == ["v1"]
    assert set(manifest["files"]) >= {f"participants.{fmt}", f"messages.{fmt}", f"chain.{fmt}", "codebook.md"}
    assert (f"personal.{fmt}" in manifest["files"]) is not anonymise
    assert manifest["heads"]["p00"]["links"] == 8 and manifest["study_digest"]["digest"] == report.digest
    assert verify.verify_export(folder, expected_digest=report.digest).ok
    assert report.redacted == (2 if anonymise else 0)  # the phone number (and the reply quoting it), replaced
    assert not verify.verify_export(folder, expected_digest="ab" * 32).ok


def _edit_text(rows: list[list[str]]) -> None:
    header = rows[0]
    row = next(r for r in rows if r[0] == "p01" and "kettle" in r[header.index("text")])
    row[header.index("text")] = row[header.index("text")].replace("kettle", "kett1e")


def _delete_message(rows: list[list[str]]) -> None:
    rows.remove(next(r for r in rows if r[0] == "p01" and r[3] == "participant"))


def _swap_cell(rows: list[list[str]]) -> None:
    header = rows[0]
    row = next(r for r in rows if r[0] == "p02")
    other = next(r for r in rows[1:] if r[0] != "p02" and r[header.index("cell")] != row[header.index("cell")])
    for column in ("cell", "cell_number", "brand", "think", "feel"):
        row[header.index(column)] = other[header.index(column)]


def _reorder(rows: list[list[str]]) -> None:
    first = next(n for n, r in enumerate(rows) if r[0] == "p00" and r[3] == "participant")
    rows[first], rows[first + 1] = rows[first + 1], rows[first]


@pytest.mark.parametrize("file, change, where", [
    ("messages.csv", _edit_text, "participant p01, message"),
    ("messages.csv", _delete_message, "participant p01, message"),
    ("participants.csv", _swap_cell, "participant p02, participants.csv row 3"),
    ("messages.csv", _reorder, "participant p00, message"),
])
def test_tampering_with_an_export_is_found_and_named(exported: Callable[..., Path], file: str,
                                                     change: Callable[[list[list[str]]], None], where: str) -> None:
    folder = exported()
    rows = _rows(folder / file)
    change(rows)
    _write(folder / file, rows)
    report = verify.verify_export(folder)
    assert not report.ok
    assert str(report.problems[0]).startswith(where), report.problems
    assert any(p.row == file and "sha256" in p.reason for p in report.problems)


def test_an_export_rehashed_to_match_itself_still_fails_the_published_digest(exported: Callable[..., Path]) -> None:
    folder = exported()
    published = verify.verify_export(folder).digest
    rows = _rows(folder / "participants.csv")
    rows.pop()  # a participant left out, and MANIFEST.json rewritten to match
    _write(folder / "participants.csv", rows)
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    dropped = next(pid for pid in manifest["heads"] if pid not in {r[0] for r in rows})
    del manifest["heads"][dropped]
    chain_rows = [r for r in _rows(folder / "chain.csv") if r[0] != dropped]
    _write(folder / "chain.csv", chain_rows)
    messages = [r for r in _rows(folder / "messages.csv") if r[0] != dropped]
    _write(folder / "messages.csv", messages)
    for name in ("participants.csv", "chain.csv", "messages.csv"):
        manifest["files"][name]["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    manifest["study_digest"]["digest"] = verify.verify_export(folder).digest
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    assert verify.verify_export(folder).ok  # consistent with itself ...
    assert not verify.verify_export(folder, expected_digest=published).ok  # ... but not what was published


def test_the_verify_and_digest_commands(exported: Callable[..., Path]) -> None:
    folder = exported()
    database = folder.parent / f"{folder.name}.db"
    runner = CliRunner()
    printed = runner.invoke(cli, ["digest", "--database", str(database)])
    assert printed.exit_code == 0, printed.output
    digest = printed.output.split()[2]
    assert "covers 4 participants and 15 messages" in printed.output
    for path in (database, folder):
        result = runner.invoke(cli, ["verify", str(path), "--digest", digest])
        assert result.exit_code == 0 and "intact: 4 participants and 15 messages" in result.output, result.output
    rows = _rows(folder / "messages.csv")
    _edit_text(rows)
    _write(folder / "messages.csv", rows)
    result = runner.invoke(cli, ["verify", str(folder)])
    assert result.exit_code == 1 and "NOT INTACT: participant p01, message" in result.output
    closed = runner.invoke(cli, ["digest", "--close", "--yes", "--database", str(database)])
    assert closed.exit_code == 0 and f"closing digest {digest}" in closed.output
    not_a_database = folder / "codebook.md"
    result = runner.invoke(cli, ["verify", str(not_a_database)])
    assert result.exit_code == 1 and "is not a Combot database" in result.output


@pytest.mark.slow
def test_the_real_server_chains_concurrent_conversations_and_closes(live_server: Callable[..., LiveServer],
                                                                   tmp_path: Path) -> None:
    """8 workers, 12 participants at once, then `combot digest --close` while it serves."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    server = live_server(workers=8)

    def person(n: int) -> None:
        with httpx.Client(timeout=60) as http:
            walk_conversation(http, server.url, params={"PROLIFIC_PID": f"pp-{n}"})

    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(person, range(12)))
    report = verify.verify_database(server.database)
    assert report.ok and report.participants == 12, report.problems
    closed = subprocess.run([sys.executable, "-m", "combot", "digest", "--close", "--yes", "--database",
                             str(server.database)], capture_output=True, text=True, timeout=60)
    assert closed.returncode == 0 and f"closing digest {report.digest}" in closed.stdout, closed.stdout + closed.stderr
    with httpx.Client(timeout=30) as http:
        refused = http.post(server.url + "api/sessions", json={})
        assert refused.status_code == 410 and "finished collecting data" in refused.json()["error"]
        resumed = http.post(server.url + "api/sessions", params={"PROLIFIC_PID": "pp-3"}, json={})
        assert resumed.status_code == 200 and resumed.json()["expects"] == "done"
    checked = subprocess.run([sys.executable, "-m", "combot", "verify", str(server.database), "--digest",
                              report.digest], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "intact: 12 participants" in checked.stdout, checked.stdout + checked.stderr


def test_an_export_with_synthetic_participants_verifies_against_the_same_digest(study_db: Callable[..., Path],
                                                                                tmp_path: Path) -> None:
    conn = store.connect(study_db(name="with-synthetic.db"))
    export.export_to_dir(conn, STUDY, tmp_path / "all", include_synthetic=True)
    export.export_to_dir(conn, STUDY, tmp_path / "real")
    conn.close()
    everyone, real = verify.verify_export(tmp_path / "all"), verify.verify_export(tmp_path / "real")
    assert everyone.ok and real.ok, everyone.problems + real.problems
    assert everyone.digest == real.digest and (everyone.participants, everyone.messages) == (4, 15)
    rows = _rows(tmp_path / "all" / "participants.csv")
    synthetic = rows[0].index("synthetic")
    next(r for r in rows[1:] if r[synthetic] == "1")[synthetic] = "0"  # a bench participant passed off as real
    _write(tmp_path / "all" / "participants.csv", rows)
    assert str(verify.verify_export(tmp_path / "all").problems[0]).startswith("participant s1, participants.csv")
