"""The pilot's report: transcripts per cell, flags, the data check, as JSON and as one HTML file.

Pure: it reads the study and what `combot.pilot` collected, and returns data or text. The HTML
is self-contained (inline CSS, no scripts, no external assets) and escapes every text it shows.
"""

from __future__ import annotations

import html
import itertools
import re
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence
from urllib.parse import parse_qsl, urlsplit

from combot.study import BLOCK_KINDS, LLM_TASKS, Study

if TYPE_CHECKING:
    from combot.pilot import Conversation, PilotOptions

# A paraphrase sharing this many words in a row with the message it answers reads as an echo.
ECHO_RUN = 8
_WORDS = re.compile(r"[a-z0-9']+")
_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
# Messages the study repeats by design when the participant repeats themselves.
_REPEATABLE = {"email_retry", "reprompt"}


def in_words(study: Study, factors: Mapping[str, str]) -> str:
    """`brand: bramble · think: high · feel: low`."""
    return " · ".join(f"{name}: {factors.get(name, '?')}" for name in study.factors)


# --- what each cell shows, by design -------------------------------------------------------------------

def cell_content(study: Study, cell: Mapping[str, str]) -> dict[str, Any]:
    """Everything a participant of this cell can be shown, block kind by block kind (and problem type)."""
    content: dict[str, Any] = {}
    mode = study.followup_mode(cell)
    for kind, blocks in study.blocks.items():
        if not blocks:
            continue
        if kind == "llm_prompt":
            if study.settings["llm.base_url"]:  # only an LLM ever reads these
                for task in LLM_TASKS:
                    for problem in study.problem_types:
                        content[f"llm_prompt:{task}:{problem}"] = study.llm_prompt(task, cell, problem)
            continue
        if kind == "questions" and mode != "questions":
            continue  # never asked in a paraphrase cell
        if BLOCK_KINDS.get(kind, {}).get("problem"):
            for problem in study.problem_types:
                found = study.block(kind, cell, problem)
                content[f"{kind}:{problem}"] = dict(found.values) if found else None
        else:
            found = study.block(kind, cell)
            content[kind] = dict(found.values) if found else None
    return content


def factor_differences(study: Study) -> dict[str, dict[str, list[str]]]:
    """For each factor and pair of levels: the kinds of text that differ between otherwise equal cells."""
    contents = {study.cell_label(cell): cell_content(study, cell) for cell in study.cells()}
    out: dict[str, dict[str, list[str]]] = {}
    for factor, levels in study.factors.items():
        out[factor] = {}
        for first, second in itertools.combinations(levels, 2):
            kinds: set[str] = set()
            for cell in study.cells():
                if cell[factor] != first:
                    continue
                a = contents[study.cell_label(cell)]
                b = contents[study.cell_label({**cell, factor: second})]
                kinds |= {key.split(":")[0] for key in a.keys() | b.keys() if a.get(key) != b.get(key)}
            out[factor][f"{first} vs {second}"] = sorted(kinds)
    return out


# --- flags ---------------------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def echoes(participant: str, bot: str, run: int = ECHO_RUN) -> bool:
    """Whether the bot's text repeats the participant's words: all of a message of 4+ words, or `run` in a row."""
    said, answer = _words(participant), _words(bot)
    if len(said) < 4:
        return False
    size = min(run, len(said))
    runs = {tuple(said[i:i + size]) for i in range(len(said) - size + 1)}
    return any(tuple(answer[i:i + size]) in runs for i in range(len(answer) - size + 1))


def _flag(severity: str, kind: str, message: str, cell: str | None = None, factor: str | None = None,
          transcripts: Iterable[str] = ()) -> dict[str, Any]:
    return {"severity": severity, "kind": kind, "cell": cell, "factor": factor, "message": message,
            "transcripts": list(dict.fromkeys(transcripts))}


def _quote(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit - 1] + "\u2026"
    return "\u201c" + text + "\u201d"


def _link_problems(url: str) -> list[str]:
    problems = []
    if _PLACEHOLDER.search(url) or "{" in url or "}" in url:
        problems.append("keeps a raw {placeholder}")
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if not value:
            problems.append(f"has an empty parameter '{name}'")
    return problems


def transcript_flags(study: Study, cell: Mapping[str, Any], transcript: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flags raised by one conversation (before they are grouped per cell)."""
    label, tid = cell["cell"], transcript["id"]
    messages = transcript["messages"]
    bots = [m for m in messages if m["from"] == "bot"]
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for message in bots:
        if message.get("kind") in _REPEATABLE:
            continue
        seen[message["text"]] = seen.get(message["text"], 0) + 1
    for text, times in seen.items():
        if times > 1:
            out.append(_flag("warning", "repeated_text", f"the bot said {_quote(text)} {times} times in one"
                             " conversation", label, transcripts=[tid]))
    for message in bots:
        raw = _PLACEHOLDER.findall(message["text"])
        if raw:
            out.append(_flag("error", "placeholder", f"a {message.get('kind') or 'bot'} message shows "
                             f"{', '.join(sorted(set(raw)))} unfilled: {_quote(message['text'])}", label,
                             transcripts=[tid]))
        link = message.get("link")
        if link:
            for problem in _link_problems(link["url"]):
                out.append(_flag("error", "placeholder", f"the survey link {problem}: {link['url']}", label,
                                 transcripts=[tid]))
    redirect = transcript.get("redirect")
    if redirect:
        for problem in _link_problems(redirect["url"]):
            out.append(_flag("error", "placeholder", f"the completion link {problem}: {redirect['url']}", label,
                             transcripts=[tid]))
    finished = transcript.get("expects") == "done"
    if study.survey_url and finished:
        links = [m["link"]["url"] for m in bots if m.get("link")]
        ids = [v for v in (transcript.get("participant_id"), *transcript.get("params", {}).values()) if v]
        if not links:
            out.append(_flag("error", "survey_link", "the conversation ended without the survey link", label,
                             transcripts=[tid]))
        elif ids and not any(value in url for url in links for value in ids):
            out.append(_flag("error", "survey_link", "the survey link carries neither the participant id nor a kept"
                             f" parameter, so survey answers cannot be joined to the chat: {links[0]}", label,
                             transcripts=[tid]))
    for position, message in enumerate(messages):
        if message["from"] != "bot":
            continue
        if message.get("fallback_reason"):
            out.append(_flag("warning", "fallback", f"the LLM was not used ({message['fallback_reason']}); the"
                             f" offline text stood in: {_quote(message['text'])}", label, transcripts=[tid]))
        if message.get("kind") == "paraphrase" or message.get("produced_by") in ("template", "llm"):
            answered = [m for m in messages[:position] if m["from"] == "participant" and m["turn"] == message["turn"]]
            if answered and echoes(answered[-1]["text"], message["text"]):
                out.append(_flag("warning", "echo", f"the paraphrase {_quote(message['text'])} repeats the"
                                 f" participant's own words {_quote(answered[-1]['text'], 60)}", label,
                                 transcripts=[tid]))
    if cell.get("followups") == "questions" and any(m.get("kind") == "paraphrase" for m in bots):
        filed = transcript.get("problem_type") or study.catch_all
        meant = transcript.get("persona_problem")
        why = (f"the persona's complaint is of type {meant!r}, so the classifier misfiled it" if meant and meant != filed
               else "as designed for a complaint of that type, but the manipulation does not reach such participants")
        out.append(_flag("warning", "catch_all", f"a question cell answered with paraphrases: the first message was"
                         f" filed as {filed!r} (the catch-all), so this participant got no scripted questions ({why})",
                         label, transcripts=[tid]))
    if transcript.get("error"):
        out.append(_flag("error", "conversation", f"the conversation failed: {transcript['error']}", label,
                         transcripts=[tid]))
    if transcript.get("player_fallbacks"):
        out.append(_flag("warning", "participant_llm", f"the participant's LLM failed {transcript['player_fallbacks']}"
                         " time(s); the persona's script answered instead", label, transcripts=[tid]))
    return out


def group_flags(flags: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flag per kind and cell (and factor): the first message, how many more, every transcript."""
    grouped: dict[tuple[Any, ...], dict[str, Any]] = {}
    counts: dict[tuple[Any, ...], int] = {}
    for flag in flags:
        key = (flag["severity"], flag["kind"], flag["cell"], flag["factor"])
        if key not in grouped:
            grouped[key] = dict(flag, transcripts=list(flag["transcripts"]))
            counts[key] = 1
            continue
        counts[key] += 1
        grouped[key]["transcripts"] = list(dict.fromkeys(grouped[key]["transcripts"] + flag["transcripts"]))
    out = []
    for key, flag in grouped.items():
        if counts[key] > 1:
            flag["message"] += f" (and {counts[key] - 1} more like it in this cell)"
        out.append(flag)
    order = {"error": 0, "warning": 1}
    return sorted(out, key=lambda f: (order.get(f["severity"], 2), f["kind"], f["cell"] or "", f["factor"] or ""))


def study_flags(study: Study, cells: Sequence[Mapping[str, Any]], differences: Mapping[str, Mapping[str, list[str]]],
                balance: Mapping[str, Any], data: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    by_label = {c["cell"]: c for c in cells}
    for factor, pairs in differences.items():
        for pair, kinds in pairs.items():
            if kinds:
                continue
            first, second = pair.split(" vs ")
            involved = [t["id"] for label, c in by_label.items() for t in c["transcripts"][:1]
                        if c["factors"].get(factor) in (first, second)]
            out.append(_flag("error", "same_levels", f"{factor} = {first} and {factor} = {second} show participants"
                             " the same texts in every cell: the manipulation does nothing. Make the texts of one"
                             " level differ (e.g. its [[empathy]], [[greeting]] or [[followups]]).", factor=factor,
                             transcripts=involved))
    if balance.get("checked") and not balance.get("ok"):
        out.append(_flag("error", "balance", f"balanced assignment did not put {balance['expected']} participants in"
                         f" every cell: {balance['per_cell']}"))
    stored = data.get("stored")
    if stored and stored.get("messages_missing"):
        out.append(_flag("error", "data", f"{stored['messages_missing']} of {stored['messages_expected']} messages"
                         " the participants sent or saw are not in the database"))
    exported = data.get("export")
    if exported:
        for name, info in exported["files"].items():
            if info["undocumented"]:
                out.append(_flag("error", "export", f"{name}.csv has columns the codebook does not describe:"
                                 f" {', '.join(info['undocumented'])}"))
    return out


# --- the report ------------------------------------------------------------------------------------------

def build(study: Study, options: PilotOptions, collected: Sequence[tuple[Conversation, Mapping[str, Any],
                                                                          list[dict[str, Any]]]],
          data: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The whole report: {"cells", "flags", "balance", ...}; see README for its shape."""
    cells: list[dict[str, Any]] = []
    by_label: dict[str, dict[str, Any]] = {}
    for cell in study.cells():
        entry: dict[str, Any] = {"cell": study.cell_label(cell), "number": study.cell_number(cell), "factors": dict(cell),
                 "in_words": in_words(study, cell), "followups": study.followup_mode(cell),
                 "timing": study.timing(cell).mode, "transcripts": []}
        cells.append(entry)
        by_label[entry["cell"]] = entry
    for conv, row, messages in sorted(collected, key=lambda item: (item[0].slot, item[0].index)):
        entry = by_label[conv.cell]
        entry["transcripts"].append({
            "id": f"c{entry['number']}-{len(entry['transcripts']) + 1}",
            "slot": conv.slot, "persona": conv.persona.key, "persona_summary": conv.persona.summary,
            "persona_problem": conv.persona.problem,
            "player": conv.player, "participant_id": conv.participant_id or None,
            "problem_type": row.get("problem_type"), "status": row.get("status"),
            "expects": conv.expects, "error": conv.error, "player_fallbacks": conv.player_fallbacks,
            "redirect": conv.redirect, "params": conv.params, "messages": messages,
        })
    per_cell = {c["cell"]: len(c["transcripts"]) for c in cells}
    expected = options.per_cell or len(_persona_keys(options))
    counts = data.get("counts")
    shown: dict[str, int] = counts if counts is not None else per_cell
    checked = counts is not None and study.assignment == "balanced"
    balance: dict[str, Any] = {"assignment": study.assignment, "expected": expected, "per_cell": shown,
                               "checked": checked,
                               "ok": checked and all(shown.get(c["cell"], 0) == expected for c in cells)}
    differences = factor_differences(study)
    flags = [f for c in cells for t in c["transcripts"] for f in transcript_flags(study, c, t)]
    flags = group_flags(flags) + study_flags(study, cells, differences, balance, data)
    return {
        "study": {"title": study.title, "path": study.path, "factors": {k: list(v) for k, v in study.factors.items()},
                  "followup_turns": study.followup_turns, "llm": bool(study.settings["llm.base_url"])},
        "options": {"per_cell": expected, "workers": options.workers,
                    "participant_llm": options.participant_llm, "participant_model": options.participant_model,
                    "personas": list(_persona_keys(options))},
        "seconds": round(seconds, 2),
        "cells": cells,
        "differences": differences,
        "flags": flags,
        "balance": balance,
        "data": data,
    }


def _persona_keys(options: PilotOptions) -> tuple[str, ...]:
    from combot.personas import PERSONAS

    return options.personas or tuple(p.key for p in PERSONAS)


def has_errors(report: Mapping[str, Any]) -> bool:
    return any(flag["severity"] == "error" for flag in report["flags"])


def summary(report: Mapping[str, Any]) -> str:
    """A few lines for the terminal."""
    errors = [f for f in report["flags"] if f["severity"] == "error"]
    warnings = [f for f in report["flags"] if f["severity"] == "warning"]
    total = sum(len(c["transcripts"]) for c in report["cells"])
    lines = [f"{total} simulated participants in {len(report['cells'])} cells, {report['seconds']:.1f} s:"
             f" {len(errors)} error flag(s), {len(warnings)} warning(s)."]
    for flag in errors + warnings:
        where = flag["cell"] or flag["factor"] or "study"
        lines.append(f"  {flag['severity']:<7} {flag['kind']:<14} {where}: {flag['message']}")
    balance = report["balance"]
    if balance["checked"]:
        lines.append(f"balance: {'ok' if balance['ok'] else 'NOT balanced'} ({balance['per_cell']})")
    exported = report["data"].get("export")
    if exported:
        lines.append("export: " + ", ".join(f"{n}.csv {i['rows']} rows" for n, i in exported["files"].items())
                     + (", every column in the codebook" if exported["ok"] else ", columns missing from the codebook"))
    return "\n".join(lines)


# --- HTML --------------------------------------------------------------------------------------------------

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#1d232a;background:#fff}
h1{font-size:1.5em}h2{margin-top:2em;border-bottom:2px solid #d5dde5;padding-bottom:.2em}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #d5dde5;padding:.3em .5em;vertical-align:top;
text-align:left}th{background:#f1f4f7}.error{color:#a3141b;font-weight:600}.warning{color:#8a5a00;font-weight:600}
.flags li{margin:.3em 0}.msg{margin:.25em 0;padding:.35em .6em;border-radius:8px;max-width:52em}
.bot{background:#eef3f8}.participant{background:#f6f6ef;margin-left:3em}.label{font-size:.8em;color:#56606b}
.differs{background:#fff4d6}.scroll{overflow-x:auto}.side td{min-width:14em;font-size:.85em}
.transcript{border-left:3px solid #d5dde5;padding-left:1em;margin:1em 0}code{background:#f1f4f7;padding:0 .2em}
.ok{color:#1d6b2f;font-weight:600}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _label(message: Mapping[str, Any]) -> str:
    parts = [message.get("kind") or "", message.get("produced_by") or ""]
    if message.get("model"):
        parts.append(f"model {message['model']}")
    if message.get("fallback_reason"):
        parts.append(f"fallback: {message['fallback_reason']}")
    if message.get("shown_ms") is not None:
        parts.append(f"computed in {message.get('compute_ms', '?')} ms, shown after {message['shown_ms']} ms (designed)")
    elif message.get("latency_ms") is not None:
        parts.append(f"ready after {message['latency_ms']} ms")
    return " · ".join(p for p in parts if p)


def _transcript_html(transcript: Mapping[str, Any]) -> str:
    out = [f'<div class="transcript" id="t-{_e(transcript["id"])}">',
           f'<h4>{_e(transcript["id"])}: {_e(transcript["persona"])}</h4>',
           f'<p class="label">{_e(transcript["persona_summary"])} · played by {_e(transcript["player"])}'
           f' · problem type {_e(transcript.get("problem_type") or "?")} · status {_e(transcript.get("status") or "?")}'
           '</p>']
    if transcript.get("error"):
        out.append(f'<p class="error">{_e(transcript["error"])}</p>')
    for message in transcript["messages"]:
        who = "bot" if message["from"] == "bot" else "participant"
        link = message.get("link")
        link_html = (f'<br><span class="label">link: {_e(link["label"])} \u2192 <code>{_e(link["url"])}</code></span>'
                     if link else "")
        out.append(f'<div class="msg {who}"><span class="label">{_e(who)} · turn {_e(message.get("turn", ""))}'
                   f' · {_e(_label(message))}</span><br>{_e(message["text"])}{link_html}</div>')
    if transcript.get("redirect"):
        out.append(f'<p class="label">then sent to <code>{_e(transcript["redirect"]["url"])}</code></p>')
    out.append("</div>")
    return "\n".join(out)


def _side_by_side(report: Mapping[str, Any]) -> str:
    cells = report["cells"]
    slots = sorted({t["slot"] for c in cells for t in c["transcripts"]})
    out = []
    for slot in slots:
        chosen = {c["cell"]: next((t for t in c["transcripts"] if t["slot"] == slot), None) for c in cells}
        if sum(t is not None for t in chosen.values()) < 2:
            continue
        persona = next(t for t in chosen.values() if t is not None)["persona"]
        turns = sorted({m.get("turn", 0) for t in chosen.values() if t for m in t["messages"]})
        out.append(f"<h3>{_e(persona)}, in every cell</h3><div class=\"scroll\"><table class=\"side\"><tr><th>turn</th>"
                   + "".join(f"<th>{_e(c['in_words'])}</th>" for c in cells) + "</tr>")
        for turn in turns:
            for who in ("participant", "bot"):
                texts = {label: [m["text"] for m in t["messages"] if m.get("turn", 0) == turn and m["from"] == who]
                         if t else [] for label, t in chosen.items()}
                if not any(texts.values()):
                    continue
                differs = len({tuple(v) for v in texts.values()}) > 1
                row = "".join(f'<td class="{"differs" if differs else ""}">'
                              + "<br><br>".join(_e(x) for x in texts[c["cell"]]) + "</td>" for c in cells)
                out.append(f"<tr><th>{_e(turn)} {_e(who)}</th>{row}</tr>")
        out.append("</table></div>")
    return "\n".join(out) or "<p>Run at least one persona in two cells to compare them.</p>"


def to_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page (no scripts, no external assets)."""
    study = report["study"]
    errors = sum(f["severity"] == "error" for f in report["flags"])
    warnings = sum(f["severity"] == "warning" for f in report["flags"])
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>Pilot: {_e(study['title'])}</title><style>{_CSS}</style></head><body>",
           f"<h1>Pilot of \u201c{_e(study['title'])}\u201d</h1>",
           f"<p>{_e(study['path'])} · {sum(len(c['transcripts']) for c in report['cells'])} simulated participants in"
           f" {len(report['cells'])} cells · {_e(report['options']['per_cell'])} per cell · "
           f"{'participants played by an LLM' if report['options']['participant_llm'] else 'scripted personas'} · "
           f"{_e(report['seconds'])} s</p>",
           f'<p><span class="{"error" if errors else "ok"}">{errors} error(s)</span>, '
           f'<span class="{"warning" if warnings else "ok"}">{warnings} warning(s)</span></p>',
           "<h2>Flags</h2>"]
    if report["flags"]:
        out.append('<ul class="flags">')
        for flag in report["flags"]:
            where = " · ".join(x for x in (flag["cell"] and f"cell {flag['cell']}", flag["factor"]
                                           and f"factor {flag['factor']}") if x)
            links = " ".join(f'<a href="#t-{_e(t)}">{_e(t)}</a>' for t in flag["transcripts"][:12])
            out.append(f'<li><span class="{_e(flag["severity"])}">{_e(flag["severity"])}</span> <code>{_e(flag["kind"])}</code>'
                       f" {_e(where)}: {_e(flag['message'])} {links}</li>")
        out.append("</ul>")
    else:
        out.append('<p class="ok">No flags.</p>')

    out.append("<h2>What differs between levels (by design)</h2><table><tr><th>factor</th><th>levels</th>"
               "<th>texts that differ</th></tr>")
    for factor, pairs in report["differences"].items():
        for pair, kinds in pairs.items():
            shown = ", ".join(kinds) if kinds else "nothing: the manipulation does nothing"
            out.append(f'<tr><td>{_e(factor)}</td><td>{_e(pair)}</td><td class="{"" if kinds else "error"}">'
                       f"{_e(shown)}</td></tr>")
    out.append("</table>")

    out.append("<h2>Side by side: the same persona in every cell, turn by turn</h2>"
               "<p>Shaded: the texts differ between cells. This is the manipulation as participants meet it.</p>")
    out.append(_side_by_side(report))

    out.append("<h2>Data check</h2>")
    balance = report["balance"]
    out.append("<table><tr><th>cell</th><th>participants</th></tr>" + "".join(
        f"<tr><td>{_e(cell)}</td><td>{_e(n)}</td></tr>" for cell, n in balance["per_cell"].items()) + "</table>")
    if balance["checked"]:
        out.append(f'<p class="{"ok" if balance["ok"] else "error"}">Balanced assignment: '
                   f'{"every cell got" if balance["ok"] else "NOT every cell got"} {_e(balance["expected"])}.</p>')
    data = report["data"]
    out.append(f"<p>Database: {_e(data.get('database', ''))}.</p>")
    stored = data.get("stored")
    if stored:
        out.append(f"<p>{_e(stored['messages_found'])} of {_e(stored['messages_expected'])} messages the participants"
                   " sent or saw are in the database.</p>")
    exported = data.get("export")
    if exported:
        out.append("<table><tr><th>export file</th><th>rows</th><th>columns</th><th>not in the codebook</th></tr>")
        for name, info in exported["files"].items():
            out.append(f"<tr><td>{_e(name)}.csv</td><td>{_e(info['rows'])}</td><td>{_e(', '.join(info['columns']))}</td>"
                       f'<td class="{"error" if info["undocumented"] else "ok"}">'
                       f"{_e(', '.join(info['undocumented']) or 'none')}</td></tr>")
        out.append("</table>")

    out.append("<h2>Cells and transcripts</h2>")
    for cell in report["cells"]:
        out.append(f"<h3>Cell {_e(cell['number'])}: {_e(cell['in_words'])}</h3>"
                   f"<p class=\"label\">follow-ups: {_e(cell['followups'])} · reply timing: {_e(cell.get('timing', ''))}"
                   f" · {len(cell['transcripts'])} transcript(s)</p>")
        out += [_transcript_html(t) for t in cell["transcripts"]]
    out.append("</body></html>")
    return "\n".join(out)
