"""The `unode` command line: parses arguments, calls into node/, maps user errors to one line.

Thin on purpose: every command's work lives in node/ (or protocol/) where tests reach it.
Each command group below has its own section; keep them apart.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from node.errors import UserError

app = typer.Typer(
    name="unode",
    help="A peer-to-peer network for merging and fusing large language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(err: UserError) -> None:
    """One line on stderr, exit code 2: the contract for every user-input error."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


# --- merge (node/merge) ---------------------------------------------------------------


# --- demo ------------------------------------------------------------------------------


# --- keys (protocol identity) -----------------------------------------------------------


# --- fusion (node/fusion) ---------------------------------------------------------------


# --- network (node/network) -------------------------------------------------------------


def main() -> None:
    try:
        app()
    except UserError as err:  # raised outside a command body (e.g. while parsing)
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
