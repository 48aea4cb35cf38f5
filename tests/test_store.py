from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Mapping

import pytest

from combot import store
from combot.errors import Conflict
from combot.store import NewMessage, Turn


def _choose(counts: Mapping[str, int]) -> tuple[str, int, dict[str, str], str]:
    return "x", 1, {"f": "x"}, "test"


def _greet(factors: Mapping[str, str]) -> tuple[dict[str, Any], list[NewMessage]]:
    return {"stage": "chat", "turn": 0}, [NewMessage("bot", "greeting", "Hello")]


def new(conn: sqlite3.Connection, pid: str = "p1", platform_id: str | None = None) -> sqlite3.Row:
    row, _ = store.create_participant(conn, participant_id=pid, token="tok-" + pid, choose_cell=_choose,
                                      greet=_greet, url_params={"PROLIFIC_PID": platform_id or ""},
                                      platform_id=platform_id)
    return row


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    return store.connect(tmp_path / "test.db")


def test_connect_sets_wal_full_sync_and_schema(conn: sqlite3.Connection) -> None:
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(store.SCHEMA_VERSION)
    assert {"participants", "messages", "emails"} <= {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}


def test_migrating_twice_is_harmless(tmp_path: Path) -> None:
    store.connect(tmp_path / "a.db").close()
    assert store.migrate(store.connect(tmp_path / "a.db")) == store.SCHEMA_VERSION


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "a.db")
    conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(RuntimeError, match="schema version 999"):
        store.connect(tmp_path / "a.db")


def test_create_stores_participant_and_greeting(conn: sqlite3.Connection) -> None:
    row = new(conn)
    assert row["status"] == "started" and row["cell"] == "x" and json.loads(row["factors"]) == {"f": "x"}
    assert [m["text"] for m in store.transcript(conn, "p1")] == ["Hello"]
    assert store.participant_by_token(conn, "tok-p1")["id"] == "p1"


def test_a_returning_platform_id_gets_the_same_participant(conn: sqlite3.Connection) -> None:
    first = new(conn, "p1", platform_id="abc")
    again, created = store.create_participant(conn, participant_id="p2", token="tok-p2", choose_cell=_choose,
                                              greet=_greet, platform_id="abc")
    assert not created and again["id"] == first["id"]
    assert conn.execute("SELECT count(*) FROM participants").fetchone()[0] == 1


def turn(version: int, client_id: str | None, text: str = "hi", email: str | None = None) -> Turn:
    return Turn(participant_id="p1", expected_version=version, turn=version + 1,
                incoming=NewMessage("participant", "message", text, client_message_id=client_id),
                replies=[NewMessage("bot", "question", f"reply to {text}", "script", latency_ms=3)],
                state={"stage": "chat", "turn": version + 1}, status="started", problem_type="A" if version == 0 else None,
                scores={"A": 0.9, "B": 0.1} if version == 0 else None, email=email)


def test_record_turn_is_atomic_and_idempotent(conn: sqlite3.Connection) -> None:
    new(conn)
    replies = store.record_turn(conn, turn(0, "c1")).replies
    assert [r["text"] for r in replies] == ["reply to hi"]
    # A retry of the same client message id returns the same reply and stores nothing twice.
    again = store.record_turn(conn, turn(0, "c1")).replies
    assert [r["id"] for r in again] == [r["id"] for r in replies]
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 3
    row = conn.execute("SELECT * FROM participants").fetchone()
    assert row["version"] == 1 and row["problem_type"] == "A" and json.loads(row["scores"])["A"] == 0.9


def test_a_stale_turn_is_a_conflict_and_writes_nothing(conn: sqlite3.Connection) -> None:
    new(conn)
    store.record_turn(conn, turn(0, "c1"))
    with pytest.raises(Conflict):
        store.record_turn(conn, turn(0, "c2", text="other"))
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 3


def test_email_goes_to_its_own_table(conn: sqlite3.Connection) -> None:
    new(conn)
    store.record_turn(conn, turn(0, None, text="[e-mail address]", email="a@example.com"))
    assert conn.execute("SELECT email FROM emails").fetchone()[0] == "a@example.com"
    assert "a@example.com" not in json.dumps([dict(r) for r in conn.execute("SELECT * FROM messages")])


def test_writes_are_visible_to_another_connection_at_once(tmp_path: Path) -> None:
    writer, reader = store.connect(tmp_path / "a.db"), store.connect(tmp_path / "a.db")
    new(writer)
    assert reader.execute("SELECT count(*) FROM messages").fetchone()[0] == 1


def test_group_commit_answers_each_write_and_a_failure_rolls_back_alone(tmp_path: Path) -> None:
    import asyncio

    async def scenario() -> tuple[list[Any], int]:
        handle = store.Store(tmp_path / "group.db")
        await handle.open()
        try:
            await handle.run(store.create_participant, participant_id="p1", token="tok-p1", choose_cell=_choose,
                             greet=_greet)

            def insert(conn: sqlite3.Connection, n: int) -> int:
                if n == 13:
                    conn.execute("INSERT INTO emails (participant_id, email, created_at) VALUES ('p1', 'x', 'y')")
                    raise Conflict("unlucky")
                conn.execute("INSERT INTO events (kind, path, at) VALUES ('test', ?, 'now')", (str(n),))
                return n

            outcomes = await asyncio.gather(*(handle.run(insert, n) for n in range(50)), return_exceptions=True)
            stored = await handle.read(lambda conn: conn.execute("SELECT count(*) FROM events WHERE kind='test'").fetchone()[0])
            emails = await handle.read(lambda conn: conn.execute("SELECT count(*) FROM emails").fetchone()[0])
            assert emails == 0  # the failed write's own insert was rolled back
            return list(outcomes), stored
        finally:
            await handle.close()

    outcomes, stored = asyncio.run(scenario())
    assert [o for o in outcomes if not isinstance(o, Exception)] == [n for n in range(50) if n != 13]
    assert isinstance(outcomes[13], Conflict)
    assert stored == 49


def test_a_client_key_is_unique_and_a_retry_returns_the_same_row(conn: sqlite3.Connection) -> None:
    first, created = store.create_participant(conn, participant_id="p1", token="tok-p1", choose_cell=_choose,
                                              greet=_greet, client_key="k" * 20)
    again, created_again = store.create_participant(conn, participant_id="p2", token="tok-p2", choose_cell=_choose,
                                                    greet=_greet, client_key="k" * 20)
    assert created and not created_again and again["id"] == first["id"]
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO participants (id, token, cell, factors, state, version, status, created_at,"
                     " client_key) VALUES ('p3', 't3', 'x', '{}', '{}', 0, 'started', 'now', ?)", ("k" * 20,))


def test_upgrading_a_version_2_database_stores_what_each_old_turn_expected(tmp_path: Path) -> None:
    import sqlite_utils

    conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    conn.row_factory = sqlite3.Row
    db = sqlite_utils.Database(conn)
    for step in store.MIGRATIONS[:2]:
        step(db)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    conn.execute("INSERT INTO participants (id, token, cell, factors, state, version, status, created_at)"
                 " VALUES ('p1', 't', 'x', '{}', '{}', 0, 'started', 'now')")
    for mid, sender, kind, reply_to in [(1, "participant", "message", None), (2, "bot", "question", 1),
                                        (3, "participant", "message", None), (4, "bot", "closing", 3),
                                        (5, "participant", "email", None), (6, "bot", "thanks", 5)]:
        conn.execute("INSERT INTO messages (id, participant_id, turn, sender, kind, text, reply_to, created_at)"
                     " VALUES (?, 'p1', 1, ?, ?, 'x', ?, 'now')", (mid, sender, kind, reply_to))
    conn.close()
    upgraded = store.connect(tmp_path / "old.db")
    got = [(r["stage"], r["expects"]) for r in upgraded.execute("SELECT * FROM messages WHERE sender = 'participant'")]
    assert got == [("chat", "message"), ("email", "email"), ("done", "done")]


def _wait_until(condition: Any, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def _someone_queued(path: Path) -> bool:
    """True while a writer holds the lock's queue, i.e. waits for the lock itself."""
    import fcntl

    with open(f"{path}.lock-queue", "a+b") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
        return False


def test_the_write_lock_passes_to_a_waiting_process_before_the_holder_takes_it_again(tmp_path: Path) -> None:
    """A writer that releases and at once wants the lock again queues behind the one already waiting
    (one flock alone let the busiest process take it again every time; the others timed out)."""
    import threading

    path = tmp_path / "lock.db"
    holder, waiter = store.WriteLock(path), store.WriteLock(path)  # separate open files conflict like processes
    order: list[str] = []

    def take(lock: store.WriteLock, name: str) -> None:
        lock.acquire()
        order.append(name)
        lock.release()

    holder.acquire()
    other = threading.Thread(target=take, args=(waiter, "waiter"))
    other.start()

    _wait_until(lambda: _someone_queued(path))
    holder.release()
    again = threading.Thread(target=take, args=(holder, "holder again"))
    again.start()
    other.join(10)
    again.join(10)
    assert order == ["waiter", "holder again"]
    holder.close()
    waiter.close()


def test_a_worker_starting_while_others_hold_the_write_lock_waits_its_turn_to_migrate(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "busy.db"
    store.connect(path).close()
    busy = store.WriteLock(path)
    busy.acquire()
    opened: list[sqlite3.Connection] = []
    starting = threading.Thread(target=lambda: opened.append(store.connect(path)))
    starting.start()
    _wait_until(lambda: _someone_queued(path))
    assert not opened  # waits for the lock instead of racing SQLite's busy handler
    busy.release()
    starting.join(10)
    assert len(opened) == 1 and store.ping(opened[0])
    opened[0].close()
    busy.close()


def test_the_cell_counts_kept_by_triggers_equal_a_count_of_the_rows(tmp_path: Path) -> None:
    """Whatever inserts, changes or deletes participants, balanced assignment's counts stay right."""
    conn = store.connect(tmp_path / "fill.db")
    insert = ("INSERT INTO participants (id, token, cell, factors, state, version, status, created_at, synthetic)"
              " VALUES (?, ?, ?, '{}', '{}', 0, ?, 'x', ?)")
    for i in range(40):
        conn.execute(insert, (f"p{i}", f"t{i}", f"c{i % 3}", ("started", "finished", "declined")[i % 4 % 3], i % 5 == 0))
    conn.execute("UPDATE participants SET status = 'finished' WHERE id IN ('p1', 'p2')")
    conn.execute("UPDATE participants SET cell = 'c9' WHERE id = 'p4'")
    conn.execute("UPDATE participants SET synthetic = 1 WHERE id = 'p7'")
    conn.execute("UPDATE participants SET status = 'declined' WHERE id = 'p8'")
    conn.execute("DELETE FROM participants WHERE id IN ('p9', 'p10')")
    for synthetic in (False, True):
        counted = {row[0]: row[1] for row in conn.execute(
            "SELECT cell, count(*) FROM participants WHERE status != 'declined' AND synthetic = ? GROUP BY cell",
            (int(synthetic),))}
        assert store.cell_counts(conn, "started", synthetic=synthetic) == counted and counted


# --- the study digest, reused by the dashboard while nothing it covers changed ---------------------

def _fresh(conn: sqlite3.Connection) -> dict[str, Any]:
    return store.study_digest(conn)


def test_the_reused_digest_follows_every_change_another_connection_makes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    writer, reader = store.connect(tmp_path / "d.db"), store.connect(tmp_path / "d.db")
    computed: list[int] = []
    heads = store.chain_heads

    def counting(conn: sqlite3.Connection) -> Any:
        computed.append(1)
        return heads(conn)

    monkeypatch.setattr(store.digests, "chain_heads", counting)

    def shown() -> dict[str, Any]:
        """What the dashboard shows, checked against a digest computed afresh at the same moment."""
        reused = store.study_digest(reader, reuse=True)
        assert reused == store.study_digest(reader)
        return reused

    new(writer, "p1")
    new(writer, "p2")
    first = shown()
    computed.clear()
    assert shown() == first and computed == [1]  # only the fresh one computed: the dashboard reused it
    # Writes the digest does not cover (the workers' heartbeats, server errors) keep it.
    store.record_worker(writer, pid=1, started_at=store.now(), rss_bytes=1)
    store.record_events(writer, [{"at": store.now(), "kind": "error", "pid": 1, "status": 503, "path": "", "detail": ""}])
    computed.clear()
    assert shown() == first and computed == [1]

    changes = [
        lambda: store.record_turn(writer, Turn(participant_id="p1", expected_version=0, turn=1,
                                               incoming=NewMessage("participant", "message", "hi"), replies=[],
                                               state={}, status="started")),
        lambda: writer.execute("UPDATE participants SET chain_head = ? WHERE id = 'p2'", ("ab" * 32,)),
        lambda: writer.execute("DELETE FROM messages WHERE id = (SELECT max(id) FROM messages)"),
        lambda: writer.execute("UPDATE participants SET synthetic = 1 WHERE id = 'p1'"),
        lambda: writer.execute("UPDATE messages SET participant_id = 'p1' WHERE id = (SELECT min(id) FROM messages"
                               " WHERE participant_id = 'p2')"),
        lambda: new(writer, "p3"),
        # By hand, as someone with the sqlite3 shell might (foreign keys are off there by default).
        lambda: writer.executescript("PRAGMA foreign_keys = OFF; UPDATE participants SET id = 'p0', synthetic = 0"
                                     " WHERE id = 'p1';"),
        lambda: writer.execute("DELETE FROM participants WHERE id = 'p3'"),
        lambda: writer.execute("INSERT INTO participants (id, token, cell, factors, state, version, status, created_at,"
                               " synthetic, chain_head) SELECT 'p9', 'tok-p9', cell, factors, state, version, status,"
                               " created_at, 0, chain_head FROM participants WHERE id = 'p2'"),
        lambda: writer.execute("INSERT INTO messages (participant_id, turn, sender, kind, text, created_at)"
                               " VALUES ('p9', 1, 'bot', 'question', 'by hand', '2026-01-01T00:00:00.000Z')"),
    ]
    before = first
    for n, change in enumerate(changes):
        change()
        after = shown()
        assert after != before, n
        before = after


def test_a_digest_is_never_reused_for_another_database_at_the_same_path(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    conn = store.connect(path)
    new(conn, "p1")
    first = store.study_digest(conn, reuse=True)
    conn.close()
    for leftover in tmp_path.iterdir():
        leftover.unlink()
    conn = store.connect(path)
    new(conn, "q1")  # as many changes as the first database had: only its id tells them apart
    assert store.study_digest(conn, reuse=True) == store.study_digest(conn) != first


def test_a_digest_seen_inside_a_write_is_not_kept(conn: sqlite3.Connection) -> None:
    new(conn, "p1")
    kept = store.study_digest(conn, reuse=True)
    with pytest.raises(RuntimeError), store.transaction(conn):
        conn.execute("UPDATE participants SET chain_head = ? WHERE id = 'p1'", ("cd" * 32,))
        assert store.study_digest(conn, reuse=True) != kept  # sees its own write, keeps nothing
        raise RuntimeError("rolled back")
    # Another change, committed, counts as many changes as the rolled-back one did.
    conn.execute("UPDATE participants SET chain_head = ? WHERE id = 'p1'", ("ef" * 32,))
    assert store.study_digest(conn, reuse=True) == store.study_digest(conn) != kept
