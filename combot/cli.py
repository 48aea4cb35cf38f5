"""The command line: each command turns its options into one library call and prints the result."""

from __future__ import annotations

import logging
import shutil
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
    help_text = f"{opt.help} [default: {opt.default if opt.kind is not list else ','.join(opt.default)}; env {opt.env_name}]"
    if opt.kind is bool:
        return click.option(f"{name}/--no-{opt.name.replace('_', '-')}", opt.name, default=None, help=help_text)
    kind = {int: int, float: float}.get(opt.kind, str)
    return click.option(name, opt.name, type=kind, default=None, help=help_text)


def _load(config_path: str | None, section: str = "", flags: dict[str, Any] | None = None) -> Study:
    path = config_path
    if path is None and Path("combot.toml").is_file():
        path = "combot.toml"
    overrides = {f"{section}.{name}": value for name, value in (flags or {}).items() if value is not None}
    try:
        return load_study(path, overrides=overrides)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    except ValueError as error:
        raise click.ClickException(str(error)) from None


@cli.command()
@_config_option
@_setting_options("server", ("host", "port", "workers", "database", "request_timeout", "graceful_timeout",
                             "max_requests", "access_log", "trusted_hosts"))
def serve(config_path: str | None, **flags: Any) -> None:
    """Serve the study: a multi-process web server for participants."""
    from combot import server

    study = _load(config_path, "server", flags)
    cfg = study.settings.section("server")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    options = server.ServeOptions(
        config_path=study.path if study.path not in ("<default>", "<string>") else None,
        database=Path(cfg["database"]), host=cfg["host"], port=cfg["port"], workers=cfg["workers"],
        graceful_timeout=cfg["graceful_timeout"], max_requests=cfg["max_requests"], access_log=cfg["access_log"],
        request_timeout=cfg["request_timeout"],
    )

    def ready() -> None:
        click.echo(f"Combot is serving '{study.title}' from {options.config_path or 'the bundled default study'}")
        click.echo(f"  participants open: {server.bound_url(options.host, options.port)}")
        click.echo(f"  database:          {options.database.resolve()}")
        click.echo(f"  workers:           {options.workers}   (Ctrl-C stops after in-flight replies finish)")

    sys.exit(server.serve(study, options, on_ready=ready))


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
    click.echo(f"Wrote {target}. Edit it, check it with `combot check`, then run `combot serve`.")


@cli.command()
@_config_option
def check(config_path: str | None) -> None:
    """Check a study file and list its cells."""
    study = _load(config_path)
    cells = study.cells()
    click.echo(f"{study.path}: OK. {len(cells)} cells, {study.followup_turns} follow-up turns, assignment {study.assignment}.")
    for cell in cells:
        click.echo(f"  {study.cell_number(cell)}. {study.cell_label(cell)}  follow-ups: {study.followup_mode(cell)}")


def main() -> None:
    """Entry point of the `combot` script and the .pyz."""
    cli(prog_name="combot")


# --- classifier commands (classify, train) ---
# --- end classifier commands ---
