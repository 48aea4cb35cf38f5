"""All SQL lives in this package, behind functions named for what they do to the study's data.

One SQLite file in WAL mode, shared by every worker process. Each process reads on one thread
and writes on another (`Store`), so the event loop never waits on the disk. Writes are short
`BEGIN IMMEDIATE` transactions, group-committed; nothing is ever held only in memory.

Callers use the names below (`from combot import store; store.record_turn(conn, turn)`); the
modules hold them by subject:

    schema        the tables, migrations v1 to v9, opening (and checking) a database
    transactions  the writers' cross-process lock, write transactions, read snapshots
    handle        `Store`: a process's reader thread and group-committing writer thread
    participants  new sessions (assignment to a cell), declines, finding a participant
    turns         messages and turns, idempotent on the client's message id
    links         hash-chain links (combot/chain.py) written as rows are stored
    digests       the study digest, closing data collection, reading the chains
    versions      the text of every study version served
    events        server errors and workers' heartbeats, for the dashboard
    backups       a consistent copy of a live database
    timestamps    stored time as sortable text
"""

from __future__ import annotations

from combot.store.backups import Backup, backup
from combot.store.digests import (
    chain_heads,
    chain_heads_of,
    chains,
    close_collection,
    message_count,
    meta,
    refuse_when_closed,
    study_digest,
    synthetic_count,
)
from combot.store.events import record_events, record_worker
from combot.store.handle import Store
from combot.store.links import _Chain, message_link_values, participant_link_values
from combot.store.participants import (
    cell_counts,
    create_participant,
    participant_by_client_key,
    participant_by_platform_id,
    participant_by_token,
    record_decline,
)
from combot.store.schema import (
    BUSY_TIMEOUT_MS,
    CHAIN_SCHEMA,
    MIGRATIONS,
    SCHEMA_VERSION,
    check_database,
    connect,
    connect_readonly,
    migrate,
    ping,
    schema_version,
)
from combot.store.timestamps import ago, now
from combot.store.transactions import WriteLock, snapshot, transaction
from combot.store.turns import (
    NewMessage,
    StoredTurn,
    Turn,
    llm_reply_count,
    recent_llm_reply_ms,
    record_turn,
    replies_to,
    transcript,
)
from combot.store.versions import record_study_version, study_versions

__all__ = [
    "BUSY_TIMEOUT_MS", "CHAIN_SCHEMA", "MIGRATIONS", "SCHEMA_VERSION", "Backup", "NewMessage", "Store", "StoredTurn",
    "Turn", "WriteLock", "_Chain", "ago", "backup", "cell_counts", "chain_heads", "chain_heads_of", "chains",
    "check_database", "close_collection", "connect", "connect_readonly", "create_participant", "llm_reply_count",
    "message_count", "message_link_values", "meta", "migrate", "now", "participant_by_client_key",
    "participant_by_platform_id", "participant_by_token", "participant_link_values", "ping", "recent_llm_reply_ms",
    "record_decline", "record_events", "record_study_version", "record_turn", "record_worker", "refuse_when_closed",
    "replies_to", "schema_version", "snapshot", "study_digest", "study_versions", "synthetic_count", "transaction",
    "transcript",
]
