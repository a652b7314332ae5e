"""The `draftloop` command line."""

from pathlib import Path
from typing import Annotated

import typer

from core.db import session_scope
from core.errors import DomainError
from core.settings import get_settings
from feedback import service
from feedback.models import Role

app = typer.Typer(help="draftloop: draft email replies and learn from reviewers' corrections.", no_args_is_help=True)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")


def _fail(error: DomainError) -> None:
    typer.secho(f"error: {error.message}", fg="red", err=True)
    raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the migrations to the configured database (DRAFTLOOP_DATABASE_URL)."""
    from migrations import upgrade

    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url, revision)
    typer.echo(f"database at {revision}: {settings.resolved_database_url}")


@tenants_app.command("create")
def tenants_create(
    slug: Annotated[str, typer.Option(help="Short id, e.g. northwind")],
    name: Annotated[str, typer.Option(help="Display name")],
    instructions: Annotated[str, typer.Option(help="The system prompt for drafting")] = "",
    instructions_file: Annotated[Path | None, typer.Option(exists=True, dir_okay=False)] = None,
) -> None:
    """Create a tenant."""
    if instructions_file is not None:
        instructions = instructions_file.read_text()
    try:
        with session_scope() as session:
            tenant = service.create_tenant(session, name=name, slug=slug, instructions=instructions)
            typer.echo(f"created tenant {tenant.slug} (id {tenant.id})")
    except DomainError as error:
        _fail(error)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant slug")],
    role: Annotated[Role, typer.Option(help="agent drafts; reviewer reviews; admin manages")],
    name: Annotated[str, typer.Option(help="What the key is for")],
) -> None:
    """Create an API key. The key is printed once; only its hash is stored."""
    try:
        with session_scope() as session:
            key, raw_key = service.create_api_key(
                session, service.get_tenant_by_slug(session, tenant), name=name, role=role
            )
            typer.echo(f"created {key.role} key {key.id} for {tenant}; store it now, it is not shown again:")
            typer.echo(raw_key)
    except DomainError as error:
        _fail(error)


@keys_app.command("revoke")
def keys_revoke(tenant: Annotated[str, typer.Option(help="Tenant slug")], key_id: int) -> None:
    """Revoke an API key by id."""
    try:
        with session_scope() as session:
            service.revoke_api_key(session, service.get_tenant_by_slug(session, tenant).id, key_id)
            typer.echo(f"revoked key {key_id}")
    except DomainError as error:
        _fail(error)


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve the HTTP API (docs at /docs). Each worker process loads the base model once."""
    import uvicorn

    uvicorn.run("api.app:create_app", factory=True, host=host, port=port, workers=workers)


@app.command()
def demo(emails: int = 3) -> None:
    """Draft replies to sample emails with the real base model and record a correction."""
    from api.demo import run_demo

    run_demo(emails)
