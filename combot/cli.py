"""The command line: each command turns its options into one library call and prints the result."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import Any, Callable

import click

from combot import __version__
from combot.errors import ConfigError
from combot.settings import OPTIONS, Option
from combot.study import Study, load_study


@click.group()
@click.version_option(__version__, prog_name="combot")
def cli() -> None:
    """Combot: run chatbot experiments with human participants."""


def _config_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--config", "config_path", type=click.Path(dir_okay=False),
                        help="Study file (default: ./combot.toml if present, else the bundled default study).")(fn)


def _setting_options(section: str, names: tuple[str, ...] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One click option per declared setting. Defaults are None, so only flags the user passed override."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed([o for o in OPTIONS if o.section == section and (names is None or o.name in names)]):
            fn = _flag(opt)(fn)
        return fn
    return decorate


def _flag(opt: Option) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    name = "--" + opt.name.replace("_", "-")
    help_text = f"{opt.help} [default: {opt.to_env(opt.default)}; env {opt.env_name}]"
    if opt.kind is bool:
        return click.option(f"{name}/--no-{opt.name.replace('_', '-')}", opt.name, default=None, help=help_text)
    kind = {int: int, float: float}.get(opt.kind, str)
    return click.option(name, opt.name, type=kind, default=None, help=help_text)


def _study_path(config_path: str | None) -> str | None:
    """--config, else ./combot.toml when there is one, else None: the bundled default study."""
    if config_path is None and Path("combot.toml").is_file():
        return "combot.toml"
    return config_path


def _load(config_path: str | None, section: str = "", flags: dict[str, Any] | None = None,
          check_classifier: bool = True) -> Study:
    path = _study_path(config_path)
    overrides = {f"{section}.{name}": value for name, value in (flags or {}).items() if value is not None}
    try:
        return load_study(path, overrides=overrides, check_classifier=check_classifier)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    except ValueError as error:
        raise click.ClickException(str(error)) from None


@cli.command()
@_config_option
@_setting_options("server", ("host", "port", "workers", "database", "request_timeout", "graceful_timeout",
                             "keep_alive_timeout", "max_requests", "access_log", "trusted_hosts", "certfile", "keyfile",
                             "forwarded_allow_ips", "reply_timing"))
def serve(config_path: str | None, **flags: Any) -> None:
    """Serve the study: a multi-process web server for participants (HTTPS with --certfile and --keyfile)."""
    from combot import server

    study = _stamped(_load(config_path, "server", flags))
    cfg = study.settings.section("server")
    if bool(cfg["certfile"]) != bool(cfg["keyfile"]):
        raise click.ClickException("HTTPS needs both a certificate and its key: give --certfile and --keyfile"
                                   " (or [server] certfile and keyfile)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    options = server.ServeOptions(
        config_path=_study_path(config_path),
        database=Path(cfg["database"]), host=cfg["host"], port=cfg["port"], workers=cfg["workers"],
        graceful_timeout=cfg["graceful_timeout"], max_requests=cfg["max_requests"], access_log=cfg["access_log"],
        request_timeout=cfg["request_timeout"], certfile=cfg["certfile"], keyfile=cfg["keyfile"],
        keep_alive_timeout=cfg["keep_alive_timeout"],
    )
    url = server.bound_url(options.host, options.port, tls=bool(options.certfile))

    from combot import preflight

    with contextlib.ExitStack() as claim:
        try:
            claim.enter_context(preflight.claimed(options.database, options.host, options.port))
        except preflight.ServeRefused as error:
            raise click.ClickException(str(error)) from None
        _serve_claimed(study, options, url)


def _serve_claimed(study: Study, options: Any, url: str) -> None:
    """`serve` once this process holds the database (see preflight.claimed)."""
    from combot import admin, preflight, server

    # The researcher token exists before any worker starts, so a newly generated one is printed here, once.
    try:
        token = admin.ensure_token(study.settings, options.database.resolve())
    except OSError as error:
        raise click.ClickException(f"cannot store the admin token beside the database: {error}") from None

    def ready() -> None:
        click.echo(f"Combot is serving '{study.title}' from {options.config_path or 'the bundled default study'}")
        click.echo(f"  study version:     {study.version}")
        click.echo(f"  participants open: {url}")
        click.echo(f"  database:          {options.database.resolve()}")
        click.echo(f"  workers:           {options.workers}   (Ctrl-C stops after in-flight replies finish)")
        click.echo(f"  researcher page:   {url}admin")
        if token.created:
            click.echo(f"  admin token:       {token.value}   (shown once; kept in {token.source})")
        elif token.source == "environment":
            click.echo("  admin token:       from COMBOT_ADMIN_TOKEN / [server] admin_token")
        else:
            click.echo(f"  admin token:       in {token.source}")
        _show_links(study)

    try:
        code = server.serve(study, options, on_ready=ready)
    except preflight.ServeRefused as error:
        raise click.ClickException(str(error)) from None
    except (RuntimeError, sqlite3.Error) as error:
        raise click.ClickException(f"cannot use the database {options.database}: {error}") from None
    sys.exit(code)


def _stamped(study: Study) -> Study:
    from combot import versioning

    try:
        return versioning.stamp(study)
    except OSError as error:
        raise click.ClickException(f"cannot read the classifier files: {error}") from None


def _show_links(study: Study, err: bool = False) -> None:
    """The hand-off links as a participant would get them, and what looks like a mistake in them."""
    from combot import recruitment

    links = recruitment.sample_links(study)
    if links:
        click.echo(f"Links a finished participant gets (e.g. {recruitment.SAMPLE_PARTICIPANT} in cell 1):", err=err)
        for label, url in links:
            click.echo(f"  {label + ':':<17}{url}", err=err)
    else:
        click.echo("No survey or completion link: the conversation ends with the thank-you.", err=err)
    for warning in recruitment.link_warnings(study):
        click.echo(f"Warning: {warning}", err=err)


@cli.command()
@click.argument("out", type=click.Path(dir_okay=False))
@_config_option
@_setting_options("server", ("database",))
def backup(out: str, config_path: str | None, **flags: Any) -> None:
    """Copy the database to OUT while the server keeps serving: a consistent, checked snapshot."""
    from combot import store

    study = _load(config_path, "server", flags)
    try:
        made = store.backup(study.settings["server.database"], out)
    except (OSError, ValueError, sqlite3.Error) as error:
        raise click.ClickException(f"backup failed: {error}") from None
    click.echo(f"Backed up {made.participants} participants and {made.messages} messages"
               f" ({made.size / 1e6:.1f} MB) to {made.path} in {made.seconds:.2f} s; integrity_check ok.")


@cli.command("systemd")
@click.option("--user", "user", default=None, help="Account the service runs as [default: you].")
@click.option("--env-file", default="combot.env", show_default=True, type=click.Path(dir_okay=False),
              help="File with OPENAI_API_KEY=... and COMBOT_ADMIN_TOKEN=... lines (keep it chmod 600).")
@_config_option
def systemd_command(user: str | None, env_file: str, config_path: str | None) -> None:
    """Print a systemd unit that serves the study in this folder as a service (restarts it if it fails)."""
    import getpass

    from combot import systemd

    study = _load(config_path)
    workdir = Path.cwd().resolve()
    argv = systemd.command() + ["serve"]
    path = _study_path(config_path)
    if path:
        argv += ["--config", str(Path(path).resolve())]
    click.echo(systemd.unit(workdir=workdir, argv=argv, user=user or getpass.getuser(),
                            env_file=Path(env_file).resolve(), graceful_timeout=study.settings["server.graceful_timeout"],
                            title=study.title, pyz=len(systemd.command()) == 2,
                            database=Path(study.settings["server.database"]).resolve()), nl=False)


@cli.command()
@click.option("--force", is_flag=True, help="Overwrite an existing combot.toml.")
@click.argument("path", default="combot.toml", type=click.Path(dir_okay=False))
def init(path: str, force: bool) -> None:
    """Write an editable copy of the default study file (combot.toml) here."""
    from combot.resources import default_study_path

    target = Path(path)
    if target.exists() and not force:
        raise click.ClickException(f"{target} already exists; use --force to overwrite it")
    shutil.copyfile(default_study_path(), target)
    command = _invocation()
    click.echo(f"Wrote {target}. Edit it, check it with `{command} check`, then run `{command} serve`.")


def _invocation() -> str:
    """How the user runs Combot, to print commands they can type: `python3 combot.pyz` from the .pyz."""
    import os
    import zipfile

    argv0 = sys.argv[0] if sys.argv else ""
    if argv0.endswith(".pyz") or (os.path.isfile(argv0) and zipfile.is_zipfile(argv0)):
        return f"python3 {argv0 if os.path.dirname(argv0) not in ('', '.') else os.path.basename(argv0)}"
    return "combot"


@cli.command()
@_config_option
def check(config_path: str | None) -> None:
    """Check a study file and list its cells."""
    study = _stamped(_load(config_path))
    cells = study.cells()
    click.echo(f"{study.path}: OK. {len(cells)} cells, {study.followup_turns} follow-up turns, assignment {study.assignment}.")
    for cell in cells:
        click.echo(f"  {study.cell_number(cell)}. {study.cell_description(cell)}  (follow-ups: {study.followup_mode(cell)})")
    click.echo(f"Study version {study.version} (stamped on every participant it serves).")
    _show_links(study)


LLM_CHECK_TEXT = "I ordered a lamp three weeks ago and when it finally came the box was crushed and the shade was broken."
LLM_HINTS = {
    "http 401": "the service refused the API key: check the variable named by [llm] api_key_env",
    "http 403": "the service refused the API key: check the variable named by [llm] api_key_env",
    "http 404": "check base_url (OpenAI's ends in /v1) and the model name",
    "http 429": "the service is rate-limiting this key; participants would get the offline paraphrase meanwhile",
    "connection": "nothing answered at base_url: check the address, the network and any proxy",
    "timeout": "no answer within [llm] timeout; raise it, or expect the offline paraphrase on slow turns",
}


@cli.command("llm-check")
@_config_option
@_setting_options("llm", ("base_url", "model", "temperature", "max_tokens", "timeout", "api_key_env"))
@click.option("--text", default=LLM_CHECK_TEXT, show_default=False, help="The participant message to paraphrase.")
def llm_check(config_path: str | None, text: str, **flags: Any) -> None:
    """Send one test paraphrase to the configured LLM and print the reply and its latency."""
    import asyncio

    from combot import llm

    study = _load(config_path, "llm", flags)
    config = llm.LLMConfig.from_settings(study.settings)
    if config is None:
        click.echo("No LLM is configured ([llm] base_url is empty and COMBOT_LLM_URL is not set):"
                   " participants get the offline paraphraser.")
        return
    for name, value in llm.describe(config).items():
        click.echo(f"  {name}: {value}")
    cell, problem = study.cells()[0], study.problem_types[0]
    system = study.llm_prompt("paraphrase", cell, problem) or ""
    click.echo(f"Asking for a paraphrase with the prompt for cell {study.cell_label(cell)}, problem {problem} ...")
    outcome = asyncio.run(llm.check(study.settings, system, text))
    if isinstance(outcome, llm.LLMReply):
        click.echo(f"OK in {outcome.latency_ms} ms from {outcome.model}:\n  {outcome.text}")
        return
    hint = LLM_HINTS.get(outcome.reason) or ("the answer cannot be shown to a participant"
                                             if outcome.reason.startswith("bad response") else "")
    raise click.ClickException(f"the LLM call failed after {outcome.latency_ms} ms: {outcome.reason}"
                               + (f" ({hint})" if hint else "") + ". Participants would get the offline paraphrase.")


@cli.command()
@click.option("--users", default="30", show_default=True,
              help="Simulated participants at once; a list such as 1,5,10,30,100 runs each level in turn.")
@click.option("--url", help="Bench a running server instead of starting one (needs its admin token).")
@click.option("--admin-token", envvar="COMBOT_ADMIN_TOKEN", default="",
              help="With --url: the study's admin token, so the simulated participants are marked synthetic"
                   " (left out of balance, dashboard and export) [env COMBOT_ADMIN_TOKEN].")
@click.option("--workers", default=8, show_default=True, help="Worker processes of the server it starts.")
@click.option("--think-time", default=0.0, show_default=True, help="Mean seconds between a participant's messages.")
@click.option("--mode", type=click.Choice(["full", "first-message"]), default="full", show_default=True,
              help="Walk the whole study, or time only the first message (the original's test).")
@click.option("--llm-latency", default=1.0, show_default=True, help="Seconds the built-in fake LLM takes per reply.")
@click.option("--no-llm", is_flag=True, help="Use the offline paraphraser (same as --llm-latency 0).")
@click.option("--duration", default=0.0, help="Keep participants cycling through the study for this many seconds.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the whole report to this file.")
@click.option("--seed", default=1, show_default=True, help="Seed for the simulated participants' choices.")
@click.option("--timing", type=click.Choice(["none", "study", "matched", "typing"]), default="none",
              show_default=True, help="Reply timing of the server it starts: 'none' measures compute time alone;"
              " 'study' follows the study's [[timing]] blocks; 'matched' or 'typing' sets that mode everywhere.")
@_config_option
def bench(users: str, url: str | None, admin_token: str, workers: int, think_time: float, mode: str,
          llm_latency: float, no_llm: bool, duration: float, json_path: str | None, seed: int,
          timing: str, config_path: str | None) -> None:
    """Load-test the study with simulated participants and report reply times, memory and data checks."""
    from combot import bench as bench_module

    try:
        levels = [int(part) for part in users.split(",") if part.strip()]
    except ValueError:
        raise click.ClickException("--users takes a number or a comma-separated list such as 1,5,10") from None
    if not levels or min(levels) < 1:
        raise click.ClickException("--users must be at least 1")
    if config_path:
        _load(config_path)
    if url and not admin_token.strip():
        raise click.ClickException(
            "--url needs the study's admin token (--admin-token or COMBOT_ADMIN_TOKEN; `serve` printed it, or see"
            " <database>.admin-token), so the simulated participants are marked synthetic instead of counting"
            " as real ones")
    options = bench_module.BenchOptions(
        users=levels, url=url, workers=workers, think_time=think_time, mode=mode, llm_latency=llm_latency,
        use_llm=not no_llm, duration=duration, config_path=config_path, seed=seed, progress=sys.stderr.isatty(),
        admin_token=admin_token.strip(), timing=timing)
    try:
        report = bench_module.run_bench(options, say=lambda line: click.echo(line, err=True))
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None
    click.echo(bench_module.format_report(report))
    if json_path:
        bench_module.write_json(report, json_path)
        click.echo(f"\nreport written to {json_path}")
    if any(level["failed"] for level in report["levels"]):
        sys.exit(1)


@cli.command()
@click.option("--per-cell", type=click.IntRange(1, 100), default=None,
              help="Simulated participants per cell [default: every persona of the bank once].")
@click.option("--out", "out_path", default="pilot-report.html", show_default=True, type=click.Path(dir_okay=False),
              help="The HTML report: one self-contained file, readable offline.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the report as JSON.")
@click.option("--url", help="Pilot a running study instead of starting a server (needs its admin token).")
@click.option("--admin-token", envvar="COMBOT_ADMIN_TOKEN", default="",
              help="With --url: the study's admin token; the simulated participants are marked synthetic (they count"
                   " towards no cell, stay out of the dashboard and export) and read back [env COMBOT_ADMIN_TOKEN].")
@click.option("--workers", default=2, show_default=True, help="Worker processes of the server it starts.")
@click.option("--participant-llm", is_flag=True,
              help="Let the [llm] service (or --participant-model) play each persona instead of its script.")
@click.option("--participant-model", help="Model name for --participant-llm [default: the [llm] model].")
@click.option("--persona", "personas", multiple=True, help="Use only these personas of the bank (repeatable).")
@_config_option
def pilot(per_cell: int | None, out_path: str, json_path: str | None, url: str | None, admin_token: str, workers: int,
          participant_llm: bool, participant_model: str | None, personas: tuple[str, ...],
          config_path: str | None) -> None:
    """Walk simulated participants through every cell and write a report of what each cell does.

    Starts the real server on a temporary copy of the study and a throwaway database (never the
    study's own), sends personas through the chat, and reports transcripts per cell, what differs
    between cells, flags and a data check. Exits 1 when a flag of severity error was raised.
    """
    import json

    from combot import pilot as pilot_module
    from combot import pilot_report

    study = _load(config_path)
    options = pilot_module.PilotOptions(
        per_cell=per_cell, workers=workers, config_path=_study_path(config_path), url=url,
        admin_token=admin_token.strip(),
        participant_llm=participant_llm, participant_model=participant_model, personas=personas)
    try:
        report = pilot_module.run_pilot(study, options, say=lambda line: click.echo(line, err=True))
    except (pilot_module.PilotError, RuntimeError) as error:
        raise click.ClickException(str(error)) from None
    Path(out_path).write_text(pilot_report.to_html(report), encoding="utf-8")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    click.echo(pilot_report.summary(report))
    click.echo(f"report: {Path(out_path).resolve()}" + (f", {Path(json_path).resolve()}" if json_path else ""))
    if pilot_report.has_errors(report):
        sys.exit(1)


@cli.command("export")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write into (created if missing).")
@click.option("--anonymise", "--anonymize", "anonymise", is_flag=True,
              help="Leave out personal.csv (e-mail addresses, platform ids, URL parameters, browsers).")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True,
              help="CSV (with spreadsheet-safe text) or JSON Lines.")
@click.option("--include-synthetic", is_flag=True,
              help="Add the simulated participants of `combot bench` and pilots, with a `synthetic` column.")
@_config_option
@_setting_options("server", ("database",))
def export_command(out_dir: str, anonymise: bool, fmt: str, include_synthetic: bool, config_path: str | None,
                   **flags: Any) -> None:
    """Export participants, messages, a codebook and (unless --anonymise) personal data for analysis."""
    from combot import export

    study = _load(config_path, "server", flags)
    try:
        conn = export.open_database(study.settings["server.database"])
        counts = export.export_to_dir(conn, study, out_dir, anonymise=anonymise, fmt=fmt,
                                      include_synthetic=include_synthetic)
    except export.ExportError as error:
        raise click.ClickException(str(error)) from None
    for name, n in counts.items():
        click.echo(f"  {name}.{fmt}: {n} rows")
    click.echo(f"  codebook.md\nWritten to {Path(out_dir).resolve()}")


@cli.command()
@click.option("--close", is_flag=True,
              help="Record this digest as the closing one and stop taking new participants and messages.")
@click.option("--yes", is_flag=True, help="With --close: do not ask for confirmation.")
@_config_option
@_setting_options("server", ("database",))
def digest(close: bool, yes: bool, config_path: str | None, **flags: Any) -> None:
    """Print the study digest (a Merkle root over every participant's hash chain) with what it covers.

    Publish it when collection closes; anyone holding the export can check it with `combot verify`.
    """
    from combot import export, store

    study = _load(config_path, "server", flags)
    database = study.settings["server.database"]
    try:
        # Closing writes to the study's own file; printing may read a read-only (archived) one.
        conn = store.connect(database) if close and Path(database).is_file() else export.open_database(database)
    except (export.ExportError, sqlite3.Error, RuntimeError) as error:
        raise click.ClickException(f"cannot use the database {database}: {error}") from None
    try:
        if close and not yes and not store.study_digest(conn)["closed_at"]:
            click.confirm(f"Close data collection in {database}? New participants and messages will be refused",
                          abort=True)
        info = store.close_collection(conn) if close else store.study_digest(conn)
    finally:
        conn.close()
    click.echo(f"study digest: {info['digest']}")
    click.echo(f"  covers {info['participants']} participants and {info['messages']} messages"
               f" (chains authoritative since {info['chain_since']})")
    if info["closed_at"]:
        click.echo(f"  collection closed at {info['closed_at']}; closing digest {info['closing_digest']}")
        if info["closing_digest"] != info["digest"]:
            click.echo("  the data no longer gives the closing digest: run `combot verify` on the database")


@cli.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--digest", "expected", help="The study digest you published; the data must give exactly this one.")
def verify(path: str, expected: str | None) -> None:
    """Recompute every hash chain and the study digest of a database or an export folder.

    Exits 0 when intact; otherwise names the first participant and row that differ and exits 1.
    """
    from combot import verify as checking

    report = (checking.verify_export(path, expected) if Path(path).is_dir()
              else checking.verify_database(path, expected))
    for note in report.notes:
        click.echo(f"  {note}")
    if not report.ok:
        for problem in report.problems:
            click.echo(f"NOT INTACT: {problem}", err=True)
        sys.exit(1)
    click.echo(f"intact: {report.participants} participants and {report.messages} messages;"
               f" study digest {report.digest}" + (" (as expected)" if expected else ""))


def main() -> None:
    """Entry point of the `combot` script and the .pyz."""
    cli(prog_name="combot")


# --- classifier commands (classify, train) ---
def _classifier_settings(config_path: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    """The [classifier] settings, with the model directory and head resolved to paths."""
    from combot.classifier import default_model_dir

    # Not checked against the head: these commands are how a researcher finds and fixes a mismatch.
    study = _load(config_path, "classifier", flags, check_classifier=False)
    cfg = dict(study.settings.section("classifier"))
    cfg["catch_all"], cfg["problem_types"] = study.catch_all, study.problem_types
    cfg["model_dir"] = Path(cfg["model_dir"]) if cfg["model_dir"] else default_model_dir()
    cfg["head"] = Path(cfg["head"]) if cfg.get("head") else None
    return cfg


@cli.command()
@click.argument("texts", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per input text.")
@_config_option
@_setting_options("classifier")
def classify(texts: tuple[str, ...], as_json: bool, config_path: str | None, **flags: Any) -> None:
    """Classify complaint texts (A, B, C or Other) and print each label with all scores.

    Pass the texts as arguments, or `-` to read one text per line from standard input.
    """
    import json

    from combot.classifier import Classifier, ModelError

    if texts == ("-",):
        texts = tuple(line.rstrip("\r\n") for line in sys.stdin if line.strip())
        if not texts:
            raise click.ClickException("no text on standard input")
    cfg = _classifier_settings(config_path, flags)
    try:
        classifier = Classifier.load(cfg["model_dir"], head=cfg["head"], threads=cfg["threads"],
                                     max_length=cfg["max_length"], threshold=cfg["threshold"],
                                     fallback_label=cfg["catch_all"], label_map=cfg["labels"])
    except (ModelError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    for text, result in zip(texts, classifier.classify(list(texts))):
        if as_json:
            click.echo(json.dumps({"text": text, "label": result.label, "top": result.top,
                                   "scores": result.scores}, ensure_ascii=False))
            continue
        scores = "  ".join(f"{name} {value:.3f}" for name, value in result.scores.items())
        note = f" (top {result.top}, below threshold {classifier.threshold:g})" if result.label != result.top else ""
        preview = text if len(text) <= 60 else text[:57] + "..."
        click.echo(f"{result.label}{note}\t{scores}\t{preview}")


@cli.command()
@click.argument("csv_path", metavar="LABELED.CSV", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write head.json into (never the shipped model/).")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2, 20),
              help="Folds of the cross-validation that estimates the scores.")
@click.option("--l2", default=None, type=click.FloatRange(min=0.0, min_open=True),
              help="L2 penalty on the head's weights [default: 0.001].")
@_config_option
@_setting_options("classifier", ("model_dir", "max_length", "threads"))
def train(csv_path: Path, out_dir: Path, folds: int, l2: float | None, config_path: str | None,
          **flags: Any) -> None:
    """Train a classifier head on your own labelled messages (a CSV with columns text,label).

    Embeds the texts with the shipped encoder, fits a regularised logistic regression, prints
    cross-validated scores and writes OUT/head.json; select it in combot.toml under [classifier].
    """
    from combot import training
    from combot.classifier import ModelError

    cfg = _classifier_settings(config_path, flags)
    click.echo(f"Training on {csv_path} with the encoder in {cfg['model_dir']} ...")
    try:
        result = training.train_head(csv_path, out_dir, model_dir=cfg["model_dir"], folds=folds,
                                     l2=l2 if l2 is not None else training.DEFAULT_L2,
                                     threads=cfg["threads"], max_length=cfg["max_length"])
    except (training.TrainingDataError, ModelError) as error:
        raise click.ClickException(str(error)) from None
    counts = ", ".join(f"{label} {n}" for label, n in result.counts.items())
    click.echo(f"{result.examples} examples ({counts}); {result.folds}-fold cross-validated scores:")
    click.echo(result.cv.table())
    click.echo(f"\nWrote {result.head_path}. To use it, put this in combot.toml:\n")
    click.echo(f'[classifier]\nhead = "{result.head_path.as_posix()}"')
    types = cfg["problem_types"]
    if set(result.labels) - set(types) or set(types) - set(result.labels) - {cfg["catch_all"]}:
        click.echo(f"\nIts labels ({', '.join(result.labels)}) are not the study's problem types ({', '.join(types)}):"
                   " rename [study] problem_types, or map them with [classifier] labels = { LABEL = \"TYPE\", ... }.")
    if cfg["catch_all"] not in result.labels:
        click.echo(f"\nNote: with no label '{cfg['catch_all']}' (the study's catch-all), only the [classifier]"
                   " threshold files a message under it.")
# --- end classifier commands ---
