"""The command line: each command turns its options into one library call and prints the result."""

from __future__ import annotations

import click

from combot import __version__


@click.group()
@click.version_option(__version__, prog_name="combot")
def cli() -> None:
    """Combot: run chatbot experiments with human participants."""


# --- classifier commands (classify, train) ---
# --- end classifier commands ---
