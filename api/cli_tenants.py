"""The command line's tenant groups: `tenants` (and each tenant's settings), `keys`, `shadow`."""

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy.orm import Session

from api.cli_common import TenantSlug, reported
from core.db import session_scope
from core.settings import get_settings
from feedback import service
from feedback.models import Role, Tenant

tenants_app = typer.Typer(help="Tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
shadow_app = typer.Typer(help="A candidate drafting in shadow beside the champion.", no_args_is_help=True)


@tenants_app.command("create")
def tenants_create(
    slug: Annotated[str, typer.Option(help="Short id, e.g. northwind")],
    name: Annotated[str, typer.Option(help="Display name")],
    instructions: Annotated[str, typer.Option(help="The system prompt for drafting")] = "",
    instructions_file: Annotated[Path | None, typer.Option(exists=True, dir_okay=False)] = None,
) -> None:
    """Create a tenant."""
    from agent.base_model import load_tokenizer
    from agent.prompt import check_instructions

    if instructions_file is not None:
        instructions = instructions_file.read_text()
    with reported():
        settings = get_settings()
        check_instructions(load_tokenizer(settings), instructions, settings.max_prompt_tokens)
        with session_scope() as session:
            tenant = service.create_tenant(session, name=name, slug=slug, instructions=instructions)
            typer.echo(f"created tenant {tenant.slug} (id {tenant.id})")


def _show_or_set(
    slug: str,
    value: Any,
    clear: bool,
    *,
    what: str,
    set_value: Callable[[Session, Tenant, Any], None],
    describe: Callable[[Session, Tenant], str],
) -> None:
    """A tenant's setting: set to `value` or cleared (None) when asked, then shown."""
    if value is not None and clear:
        raise typer.BadParameter(f"give {what} or --clear, not both")
    with reported():
        with session_scope() as session:
            found = service.get_tenant_by_slug(session, slug)
            if value is not None or clear:
                set_value(session, found, value)
            typer.echo(describe(session, found))


@tenants_app.command("adapter-scale")
def tenants_adapter_scale(
    tenant: TenantSlug,
    scale: Annotated[float | None, typer.Argument(help="In (0, 2], at most two decimals; none: show it")] = None,
    clear: Annotated[bool, typer.Option(help="Serve each version at its own chosen scale again")] = False,
) -> None:
    """Show or set the scale every version of the tenant's adapters is served at; it wins over the
    scale chosen for each version on its validation slice."""
    from training import registry

    def describe(session: Session, found: Tenant) -> str:
        if found.adapter_scale is not None:
            return f"{tenant}: every adapter version is served at scale {found.adapter_scale:g} (the tenant's setting)"
        current = registry.champion(session, found.id)
        champion = f"the champion v{current.version} at {current.scale:g}" if current else "no champion yet"
        return f"{tenant}: each adapter version is served at its chosen scale; {champion}"

    _show_or_set(tenant, scale, clear, what="a scale", set_value=service.set_adapter_scale, describe=describe)


@tenants_app.command("organization")
def tenants_organization(
    tenant: TenantSlug,
    organization: Annotated[str | None, typer.Argument(help="The organization's slug; none: show it")] = None,
    clear: Annotated[bool, typer.Option(help="A tenant of its own again, in no organization")] = False,
) -> None:
    """Show or set the organization a tenant is a team of. A team without a champion of its own
    drafts with its organization's, and its adapters can be combined with the organization's."""

    def set_value(session: Session, found: Tenant, slug: str | None) -> None:
        parent = service.get_tenant_by_slug(session, slug) if slug is not None else None
        service.set_organization(session, found, parent)

    def describe(session: Session, found: Tenant) -> str:
        parent = session.get(Tenant, found.organization_id) if found.organization_id else None
        return f"{tenant} is a team of {parent.slug}" if parent else f"{tenant} belongs to no organization"

    _show_or_set(tenant, organization, clear, what="an organization", set_value=set_value, describe=describe)


@tenants_app.command("shadow-corrections")
def tenants_shadow_corrections(
    tenant: TenantSlug,
    count: Annotated[int | None, typer.Argument(help="Live corrections to decide a shadow on; none: show it")] = None,
    clear: Annotated[
        bool, typer.Option(help="Promote candidates at once again (a running shadow is rejected)")
    ] = False,
) -> None:
    """Show or set how many live corrections a candidate that passed the gate is compared on, in
    shadow beside the champion, before it is promoted or rejected."""
    from training import shadow

    def describe(session: Session, found: Tenant) -> str:
        if found.shadow_corrections is None:
            return f"{tenant}: a candidate that passes the gate is promoted at once"
        return (
            f"{tenant}: a candidate that passes the gate drafts in shadow until "
            f"{found.shadow_corrections} corrections are scored"
        )

    def set_value(session: Session, found: Tenant, value: int | None) -> None:
        shadow.set_corrections(session, found, value, actor="cli")

    _show_or_set(tenant, count, clear, what="a number", set_value=set_value, describe=describe)


@shadow_app.command("status")
def shadow_status(tenant: TenantSlug) -> None:
    """The shadow's live comparison with the champion, and the last shadow decided."""
    from training import shadow

    with reported():
        with session_scope() as session:
            found = service.get_tenant_by_slug(session, tenant)
            status = shadow.status(session, found.id)
            if status.live is None:
                typer.echo(f"{tenant}: no version is in shadow")
            else:
                live = status.live
                typer.echo(
                    f"{tenant}: v{live.shadow_version} in shadow, {live.scored} of {live.needed} corrections scored "
                    f"({live.drafts} shadow drafts)"
                )
                typer.echo(f"  {live.summary()}")
            if status.last_decision is not None:
                event = status.last_decision
                typer.echo(f"last decision ({event.created_at:%Y-%m-%d %H:%M}): {event.action}: {event.reason}")


@keys_app.command("create")
def keys_create(
    tenant: TenantSlug,
    role: Annotated[Role, typer.Option(help="agent drafts; reviewer reviews; admin manages")],
    name: Annotated[str, typer.Option(help="What the key is for")],
) -> None:
    """Create an API key. The key is printed once; only its hash is stored."""
    with reported():
        with session_scope() as session:
            key, raw_key = service.create_api_key(
                session, service.get_tenant_by_slug(session, tenant), name=name, role=role
            )
            typer.echo(f"created {key.role} key {key.id} for {tenant}; store it now, it is not shown again:")
            typer.echo(raw_key)


@keys_app.command("revoke")
def keys_revoke(tenant: TenantSlug, key_id: int) -> None:
    """Revoke an API key by id."""
    with reported():
        with session_scope() as session:
            service.revoke_api_key(session, service.get_tenant_by_slug(session, tenant).id, key_id)
            typer.echo(f"revoked key {key_id}")
