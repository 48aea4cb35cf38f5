"""codebook.md: the data dictionary written with every export, describing every column and value."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Mapping, Sequence

from combot import __version__, chain, store
from combot.study import Study

if TYPE_CHECKING:
    from combot.export import Layout

# The original study's problem types; a study with other labels gets a generic description.
PROBLEM_MEANINGS = {
    "A": "defective or poor-quality product",
    "B": "delivery problem (late, lost, damaged in transit)",
    "C": "mistreatment by an employee (rude, dismissive)",
    "Other": "anything else",
}
def problem_meaning(study: Study, problem: str) -> str:
    """What a problem type stands for, in words (the original study's, or the study's catch-all)."""
    if problem == study.catch_all:
        return "anything else (the catch-all)"
    return PROBLEM_MEANINGS.get(problem, "as labelled in the study file")


KIND_MEANINGS = {
    ("bot", "greeting"): "the bot's first message",
    ("bot", "reprompt"): "asks again for an experience: the participant's message before it held none yet"
                         " (a greeting such as \"hi\"), as judged by the classifier's opener head",
    ("bot", "question"): "a scripted follow-up question from the bank for the problem type",
    ("bot", "paraphrase"): "a paraphrase of the participant's message asking them to say more",
    ("bot", "empathy"): "the understanding/empathy statement (cells whose empathy text is not empty)",
    ("bot", "closing"): "the closing message asking for an e-mail address",
    ("bot", "email_retry"): "the request to type the e-mail address again (the last one was not one)",
    ("bot", "thanks"): "the final thank-you (with the survey link on the page)",
    ("participant", "message"): "a chat message typed by the participant",
    ("participant", "email"): "the participant's answer to the e-mail question, never its text: \"[e-mail"
                              " address]\" (the address itself is only in personal.csv), \"[not an e-mail"
                              " address]\" (asked again), or \"[no e-mail address given]\" (declined with one of"
                              " the study's email_skip_words)",
}
PRODUCED_BY_MEANINGS = {
    "participant": "typed by the participant",
    "script": "a fixed text from the study file",
    "template": "the offline paraphraser filling a template from the study file",
    "llm": "a language model (see the model column)",
}


def _versions(study: Study, versions: Sequence[sqlite3.Row]) -> str:
    """Which versions of the study participants saw; each file's SHA-256 starts with its version."""
    lines = ["A study version is the first 12 hex digits of the SHA-256 of `study/<version>.toml`: the study file"
             " after defaults, with the SHA-256 of the classifier head and encoder in its first lines. Editing"
             " combot.toml between two runs of `serve` makes a new version.\n"]
    if not versions:
        lines.append("No study version is recorded in this database.\n")
    else:
        lines += ["| study_version | participants | first served (UTC) | Combot | classifier head sha256"
                  " | encoder sha256 |", "| --- | --- | --- | --- | --- | --- |"]
        for v in versions:
            lines.append(f"| `{v['version']}` | {v['participants']} | {v['first_served_at']} | {v['combot_version']}"
                         f" | `{v['head_sha256']}` | `{v['encoder_sha256']}` |")
        lines[-1] += "\n"
        if len(versions) > 1:
            lines.append(f"\nParticipants span {len(versions)} versions of the study: compare the files in `study/`"
                         " before pooling them.\n")
    return "\n".join(lines)


def _table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| column | type | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | {kind} | {meaning} |" for name, kind, meaning in rows]
    return "\n".join(lines) + "\n"


def codebook(conn: sqlite3.Connection, study: Study, layout: Layout, fmt: str, anonymise: bool,
             counts: Mapping[str, int], versions: Sequence[sqlite3.Row] = ()) -> str:
    ext = fmt
    missing = "an empty cell" if fmt == "csv" else "null"
    labels = ", ".join(f"`{p}`" for p in study.problem_types)
    out = [f"# Codebook: {study.title}\n",
           f"Exported {store.now()} (UTC) by Combot {__version__}. Rows: "
           + ", ".join(f"{n} in {k}.{ext}" for k, n in counts.items())
           + (". personal data left out (--anonymise)." if anonymise else ".")
           + (" Synthetic participants (`combot bench`, pilots) included: see `synthetic`." if layout.include_synthetic
              else " Synthetic participants (`combot bench`, pilots) left out (`--include-synthetic` adds them).")
           + "\n",
           "Timestamps are UTC in ISO 8601 with milliseconds (`2024-05-01T09:30:00.123Z`). "
           f"A missing value is {missing}.\n"]

    participants = [
        ("participant_id", "text", "Combot's random id for the participant. The survey link carries it as"
                                   " `{participant_id}`: join the survey data on it."),
        ("cell", "text", "the participant's cell: the factor levels joined by `-` (see Cells below); empty for a"
                         " decline"),
        ("cell_number", "integer", f"1 to {len(study.cells())}, the cell's number (see Cells); the survey link's"
                                   " `{cell}`"),
    ]
    for name, column in layout.factors.items():
        levels = ", ".join(f"`{level}`" for level in study.factors[name])
        participants.append((column, "text", f"level of the factor {name}: {levels}"))
    participants.append(("problem_type", "text", f"the problem type the classifier gave the first message that"
                                                 f" described an experience (or the last attempt, see"
                                                 f" `described_experience`): one of {labels}; empty before then"))
    for label, column in layout.scores.items():
        participants.append((column, "number 0-1", f"the classifier's score for `{label}` on that message (a"
                                                   " participant's scores sum to 1)"))
    participants += [
        ("described_experience", "integer", "1: the opening described an experience; 0: it never did, even after"
                                            f" {study.max_reprompts} re-prompt(s) (`[study] max_reprompts`), so the"
                                            " problem type rests on a message without one: consider excluding;"
                                            " empty before the opening is settled, for declines, and when the"
                                            " classifier has no opener head"),
        ("reprompts", "integer", "how many times the bot asked again because an opening message held no experience"
                                 " yet (`reprompt` messages); empty for a decline"),
    ]
    participants += [
        ("status", "text", "`started`: has a cell but did not finish (still chatting, or left; see"
                           " `last_active_at`); `finished`: reached the end after "
                           + ("giving an e-mail address or declining to (with one of the study's"
                              f" email_skip_words: {', '.join(study.email_skip_words)}; see the `email` message)"
                              if study.email_skip_words else "giving an e-mail address")
                           + "; `declined`: declined on the consent page (no cell, counts towards none)"),
        ("consent", "text", "`agreed` on the consent page, `declined`, or `not asked` (no consent page then)"),
        ("started_at", "timestamp", "when the session was created (after agreeing, when consent was asked)"),
        ("finished_at", "timestamp", "when the e-mail address was accepted"
                                     + (" or declined" if study.email_skip_words else "")
                                     + "; empty when not finished"),
        ("last_active_at", "timestamp", "the participant's last stored message (or `started_at`)"),
        ("seconds_spent", "number", "`finished_at` (or `last_active_at` when not finished) minus `started_at`"),
        ("turns", "integer", "participant messages stored, the e-mail answer, any rejected e-mail attempt and"
                             " any re-prompted opening message included"),
        ("assignment", "text", "how the cell was chosen: `balanced` (the least-filled cell, ties at random) or"
                               " `random` (a plain draw); `(seed N)` when a seed makes the sequence reproducible."
                               f" Filled counted as: `{study.fill}`"
                               + (f" (finished, or active in the last {study.active_minutes} minutes)"
                                  if study.fill == "finished_or_active" else " (everyone given the cell)")),
        ("study_version", "text", "the version of the study the participant saw: the file study/<version>.toml"
                                  " holds its full text (see Study versions below); empty for participants stored"
                                  " before versions were recorded"),
    ]
    if layout.include_synthetic:
        participants.append(("synthetic", "integer", "1: a simulated participant made by `combot bench` or a pilot"
                                                     " (never counted towards a cell); 0: a real participant"))
    out += [f"## participants.{ext}\n", "One row per participant, declines included.\n", _table(participants)]

    cell_lines = ["| cell_number | cell | " + " | ".join(study.factors) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in study.factors) + " |"]
    for cell in study.cells():
        cell_lines.append(f"| {study.cell_number(cell)} | `{study.cell_label(cell)}` | "
                          + " | ".join(cell[name] for name in study.factors) + " |")
    out += ["### Cells\n", "\n".join(cell_lines) + "\n"]
    problem_lines = [f"- `{p}`: {PROBLEM_MEANINGS.get(p, 'as labelled in the study file')}"
                     + (" (the catch-all)" if p == study.catch_all else "") for p in study.problem_types]
    out += ["### Problem types\n", "\n".join(problem_lines) + "\n"]
    out += ["### Study versions\n", _versions(study, versions)]

    kinds = [(row[0], row[1]) for row in conn.execute("SELECT DISTINCT sender, kind FROM messages ORDER BY 1, 2")]
    known = list(KIND_MEANINGS)
    kind_lines = [f"- `{kind}` ({sender}): {KIND_MEANINGS.get((sender, kind), 'not described')}"
                  for sender, kind in known + [k for k in kinds if k not in known]]
    produced = [row[0] for row in conn.execute("SELECT DISTINCT produced_by FROM messages WHERE produced_by IS NOT"
                                               " NULL ORDER BY 1")]
    produced_lines = [f"- `{name}`: {PRODUCED_BY_MEANINGS.get(name, 'not described')}"
                      for name in list(PRODUCED_BY_MEANINGS) + [p for p in produced if p not in PRODUCED_BY_MEANINGS]]
    messages = [
        ("participant_id", "text", "the participant (see participants)"),
        ("message_id", "integer", "increases in the order messages were stored"),
        ("turn", "integer", "0: the greeting; k: the participant's k-th message and the bot's replies to it"),
        ("sender", "text", "`bot` or `participant`"),
        ("kind", "text", "what the message is; see Kinds below"),
        ("text", "text", "exactly what was shown or sent (newlines kept; see Spreadsheets below)"
                         + ("; e-mail addresses and phone numbers typed into it are replaced by `[email]` and"
                            " `[phone]` (--anonymise)" if anonymise else "")),
        ("produced_by", "text", "how the text was made; see below"),
        ("model", "text", "the language model's name when `produced_by` is `llm`"),
        ("latency_ms", "integer", "milliseconds from receiving the participant's message until this reply's text"
                                  " was ready, whoever wrote it (script, template or language model; a"
                                  " fallback's includes the wait for the model); empty for the greeting and for"
                                  " participant messages"),
        ("compute_ms", "integer", "milliseconds from receiving the participant's message until every bot reply of"
                                  " the turn was ready to store (classifier, language model or its fallback"
                                  " included): the same for every bot message of one turn. Empty for the greeting,"
                                  " for participant messages and for turns stored before Combot recorded it"),
        ("shown_ms", "integer", "milliseconds from receiving the participant's message until this reply was due on"
                                " the participant's screen, as the cell's reply timing designed it (see Reply"
                                " timing below): the turn's first reply at the later of `compute_ms` and its"
                                " designed delay (held at most 30 s and at most half the server's request"
                                " timeout), each further reply of the turn its own typing delay after the one"
                                " before. Decided before the turn is stored and never updated: the server waits"
                                " until the turn's first reply is due, then stores the turn and answers, so every"
                                " reply leaves the server the commit's own few milliseconds after `shown_ms` (in"
                                " every cell and mode alike; an LLM reply's `shown_ms` is its `compute_ms`,"
                                " stored as soon as its text arrived). Network time to"
                                " the participant's browser is not included. Empty where `compute_ms` is"),
        ("fallback_reason", "text", "why a scripted or template text stood in for a language model (e.g. a"
                                    " timeout); empty otherwise"),
        ("timestamp", "timestamp", "when the message was stored"),
        ("experience_score", "number 0-1", "for each opening message the classifier saw (the first, and any after"
                                           " a re-prompt): the opener head's probability that it describes an"
                                           " experience; empty for other messages"),
        ("stage", "text", "on a participant message and the greeting: the conversation's stage after it, as the"
                          " engine decided (e.g. `chat`, `email`, `done`); empty on the bot's replies"),
        ("expects", "text", "on a participant message and the greeting: what the page asked for next (`message`,"
                            " `email` or `done`); empty on the bot's replies"),
    ]
    for label, column in layout.message_scores.items():
        messages.append((column, "number 0-1", f"for each opening message: the classifier's score for `{label}`"
                                               " (every attempt's scores, not only the deciding one's)"))
    timing_lines = [f"- cell {study.cell_number(cell)} `{study.cell_label(cell)}`: {study.timing(cell).describe()}"
                    for cell in study.cells()]
    out += [f"## messages.{ext}\n", "One row per message, ordered by participant and then as stored.\n",
            _table(messages), "### Kinds\n", "\n".join(kind_lines) + "\n", "### produced_by\n",
            "\n".join(produced_lines) + "\n", "### Reply timing\n",
            "When each cell's replies were shown, as designed in the study's `[[timing]]` blocks at export time:"
            " `matched` holds a reply the language model did not write for a delay drawn from the study's"
            " latest (up to 64) `compute_ms` of replies it did write, so every cell's reply times share one"
            " distribution; `typing` waits a delay that grows with the reply's length; `none` shows replies when"
            " computed. A reply that took longer to compute than its delay is shown when ready.\n",
            "\n".join(timing_lines) + "\n"]

    if anonymise:
        out += ["## personal data\n", "Left out of this export (--anonymise): no e-mail addresses, platform ids, URL"
                " parameters or browser strings. In message texts, e-mail addresses are replaced by `[email]` and phone"
                " numbers (7 to 15 digits; dates and amounts are kept) by `[phone]`; otherwise texts are as"
                " participants typed them and may still hold what they chose to write about themselves (names,"
                " places).\n"]
    else:
        personal = [
            ("participant_id", "text", "the participant (see participants)"),
            ("email", "text", "the e-mail address given at the end; empty when none"),
            ("platform_id", "text", "the value of the URL parameter `" + study.settings["recruitment.platform_id"]
             + "` (a returning id resumed its session)"),
        ]
        for name, column in layout.params.items():
            personal.append((column, "text", f"the URL parameter `{name}` the study link was opened with"))
        personal.append(("user_agent", "text", "the browser's User-Agent string (can help identify a person)"))
        out += [f"## personal.{ext}\n", "Personal data (ethics boards treat e-mail addresses and platform ids"
                " so): keep apart from the research data; `--anonymise` leaves this file out.\n", _table(personal)]

    out += _tamper_evidence(conn, ext, anonymise)

    notes = ["## Reading the files\n"]
    if fmt == "csv":
        notes.append(
            "- UTF-8 without a byte-order mark, comma-separated, fields quoted when needed (RFC 4180); a message"
            " text may span lines inside its quotes.\n"
            "- R: `read.csv(\"messages.csv\", encoding = \"UTF-8\")` or `readr::read_csv()`; pandas:"
            " `pd.read_csv(\"messages.csv\")`; Stata: `import delimited using messages.csv, encoding(utf-8)"
            " bindquote(strict)`; Excel: Data > From Text/CSV, File origin UTF-8.\n"
            "- Spreadsheets: a text cell that begins with `=`, `+`, `-`, `@`, a tab or a carriage return has a"
            " `'` put in front, so that no spreadsheet runs it as a formula. To undo it in R:"
            " `sub(\"^'(?=[-=+@\\t\\r])\", \"\", x, perl = TRUE)`; in pandas:"
            " `s.str.replace(r\"^'(?=[-=+@\\t\\r])\", \"\", regex=True)`.\n")
    else:
        notes.append("- JSON Lines: one JSON object per line, UTF-8, values as stored (no spreadsheet"
                     " neutralisation). R: `jsonlite::stream_in(file(\"messages.jsonl\"))`; pandas:"
                     " `pd.read_json(\"messages.jsonl\", lines=True)`.\n")
    out += notes
    return "\n".join(out)


def _tamper_evidence(conn: sqlite3.Connection, ext: str, anonymise: bool) -> list[str]:
    """chain.csv, MANIFEST.json, and plainly what `combot verify` proves and what it does not."""
    meta = store.meta(conn)
    rows = [
        ("participant_id", "text", "the participant"),
        ("seq", "integer", "the link's place in the participant's chain, from 0"),
        ("link", "text", "`participant` (the participant row), `status` (a status change, its content in the"
                         " following columns) or `message` (the row of messages with `message_id`)"),
        ("message_id", "integer", "the message of a `message` link"),
        ("redacted", "integer", "1 on a `message` link whose text this anonymised export changed (an e-mail address"
                                " or phone number replaced): its hash is the original row's, so only its place in the"
                                " chain can be checked; empty otherwise"),
        ("at", "timestamp", "when a status change was stored"),
        ("status", "text", "a status change: the participant's status from then on"),
        ("problem_type", "text", "a status change: the problem type from then on"),
        ("scores", "text", "a status change: the classifier's scores, `label:score` pairs sorted by label"),
        ("finished_at", "timestamp", "a status change: the finish time from then on"),
        ("described_experience", "integer", "a status change: 1 when the opening described an experience, 0 when"
                                            " not, empty before it was settled"),
        ("hash", "text", "SHA-256 (hex) of the previous link's hash followed by this link's encoding"),
    ]
    covered = "\n".join(f"- `{kind}` link: " + ", ".join(f"`{name}`" for name in names)
                         for kind, names in chain.FIELDS.items())
    since = meta.get("chain_since", "unknown")
    upgraded = meta.get("chain_backfilled", "")
    out = [f"## chain.{ext}\n",
           "Every participant's hash chain, one row per link in the order the links were written: first the"
           " participant row, a status row, the greeting, then each turn's messages followed by a status row when"
           " the status, problem type, scores, finish time or `described_experience` changed.\n", _table(rows),
           "## Tamper evidence\n",
           "Each row is chained as it is stored, inside the same database transaction: its hash is"
           " SHA-256(previous hash of the same participant, 32 zero bytes for the first, followed by the link's"
           " encoding). The encoding is UTF-8 text: `combot-chain-1`, a newline, the link kind, a newline, then for"
           " each covered field in the order below whose value is not null or empty: the field name, `=`, the"
           " value's length in UTF-8 bytes, `:`, the value and a newline. Values are written as stored: text as is,"
           " integers in decimal, timestamps exactly as in these files, scores as `label:score` pairs sorted by"
           " label (each score the shortest decimal that reads back as the same double). The chain covers, by"
           " export column name (`started_at`, `timestamp` are the stored times; `consent` and `synthetic` as in"
           " participants):\n",
           covered + "\n",
           "Not covered: `turns`, `last_active_at` and `seconds_spent` (they follow from the messages), the factor"
           " columns (they spell out `cell`, which is covered; verify checks they agree), the score columns of"
           " participants (verify checks them against the last status row), everything in personal data"
           " (e-mail addresses, platform ids, URL parameters, browsers), and what the server keeps for itself"
           " (session tokens, client message ids, the conversation's internal state).\n",
           "The **study digest** is the Merkle tree hash of RFC 6962 over one leaf per participant (synthetic"
           " participants left out), in order of participant id: the id in UTF-8, a zero byte, then the chain head"
           " (32 bytes). `combot digest` prints it; publish it when collection closes (`combot digest --close`"
           " records it and stops taking participants).\n",
           f"The chains are authoritative from **{since}** (UTC), when this database first stored them."
           + (f" Rows stored before then ({upgraded}) got their chains computed once at that moment, from the"
              " rows as they were then; for those, a chain shows nothing changed after that moment, not before"
              " it, and their status history is a single status row with the values found."
              if upgraded and not upgraded.startswith("0 participants") else "") + "\n",
           "`MANIFEST.json` holds the SHA-256 of every file of this export, each participant's chain head, the"
           " study digest, the study versions and the Combot version. `combot verify FOLDER` recomputes every"
           " file hash, every chain from these files and the digest, and names the first participant and row that"
           " differ; `--digest` compares with the digest you published.\n",
           "What a check proves: that these files hold exactly the rows whose chains give the digest in"
           " MANIFEST.json, so when that digest equals one published before (with a preregistration or at"
           " closing), nothing covered was changed, added, removed or re-ordered since. What it does not prove:"
           " that the published digest came from honest data (whoever runs the server could have altered rows"
           " before they were chained, or before publishing), or anything about the columns listed as not"
           " covered. A digest in MANIFEST.json that nobody published earlier proves only that the files agree"
           " with each other, since whoever holds them could recompute every hash.\n",
    ]
    if anonymise:
        out.append("This export is anonymised. The chains cover no file it leaves out, so it verifies against the"
                   " same study digest as a full export, and proves the same about every row it holds except the"
                   " messages marked `redacted` in chain.csv: their e-mail addresses and phone numbers were"
                   " replaced here, so their content cannot be checked, only that they are there, in their place"
                   " (`combot verify` reports how many; whoever holds the files could mark more rows so, and change"
                   " them). It says nothing about the personal data left out, nor whether message texts still hold"
                   " what participants wrote about themselves.\n")
    else:
        out.append(f"personal.{ext} is covered by its file hash in MANIFEST.json only: a check shows it is"
                   " unchanged since this export, not that it is what was collected.\n")
    return out
