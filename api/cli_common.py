"""What the command groups of the `draftloop` command line share (api/cli.py)."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from core.errors import DomainError

TenantSlug = Annotated[str, typer.Option(help="Tenant slug")]  # as --tenant


@contextmanager
def reported() -> Iterator[None]:
    """A domain error ends the command with its message (which says what to fix) and exit code 1."""
    try:
        yield
    except DomainError as error:
        typer.secho(f"error: {error.message}", fg="red", err=True)
        raise typer.Exit(1) from None
