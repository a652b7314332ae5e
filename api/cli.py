"""The `draftloop` command line."""

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from core.db import session_scope
from core.errors import DomainError
from core.settings import get_settings
from feedback import service
from feedback.models import Role, Split
from training.models import ExportFormat, GgufDtype, SnapshotKind

app = typer.Typer(help="draftloop: draft email replies and learn from reviewers' corrections.", no_args_is_help=True)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
adapters_app = typer.Typer(help="A tenant's adapter versions.", no_args_is_help=True)
datasets_app = typer.Typer(help="Training datasets built from corrections.", no_args_is_help=True)
shadow_app = typer.Typer(help="A candidate drafting in shadow beside the champion.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
app.add_typer(datasets_app, name="datasets")
app.add_typer(shadow_app, name="shadow")


@contextmanager
def _reported() -> Iterator[None]:
    """A domain error ends the command with its message (which says what to fix) and exit code 1."""
    try:
        yield
    except DomainError as error:
        typer.secho(f"error: {error.message}", fg="red", err=True)
        raise typer.Exit(1) from None


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
    from agent.base_model import load_tokenizer
    from agent.prompt import check_instructions

    if instructions_file is not None:
        instructions = instructions_file.read_text()
    with _reported():
        settings = get_settings()
        check_instructions(load_tokenizer(settings), instructions, settings.max_prompt_tokens)
        with session_scope() as session:
            tenant = service.create_tenant(session, name=name, slug=slug, instructions=instructions)
            typer.echo(f"created tenant {tenant.slug} (id {tenant.id})")


@tenants_app.command("adapter-scale")
def tenants_adapter_scale(
    tenant: Annotated[str, typer.Option(help="Tenant slug")],
    scale: Annotated[float | None, typer.Argument(help="In (0, 2], at most two decimals; none: show it")] = None,
    clear: Annotated[bool, typer.Option(help="Serve each version at its own chosen scale again")] = False,
) -> None:
    """Show or set the scale every version of the tenant's adapters is served at; it wins over the
    scale chosen for each version on its validation slice."""
    from training import registry

    if scale is not None and clear:
        raise typer.BadParameter("give a scale or --clear, not both")
    with _reported():
        with session_scope() as session:
            found = service.get_tenant_by_slug(session, tenant)
            if scale is not None or clear:
                service.set_adapter_scale(session, found, scale)
            current = registry.champion(session, found.id)
            if found.adapter_scale is not None:
                typer.echo(
                    f"{tenant}: every adapter version is served at scale {found.adapter_scale:g} (the tenant's setting)"
                )
            else:
                champion = f"the champion v{current.version} at {current.scale:g}" if current else "no champion yet"
                typer.echo(f"{tenant}: each adapter version is served at its chosen scale; {champion}")


@tenants_app.command("organization")
def tenants_organization(
    tenant: Annotated[str, typer.Option(help="Tenant slug")],
    organization: Annotated[str | None, typer.Argument(help="The organization's slug; none: show it")] = None,
    clear: Annotated[bool, typer.Option(help="A tenant of its own again, in no organization")] = False,
) -> None:
    """Show or set the organization a tenant is a team of. A team without a champion of its own
    drafts with its organization's, and its adapters can be combined with the organization's."""
    if organization is not None and clear:
        raise typer.BadParameter("give an organization or --clear, not both")
    with _reported():
        with session_scope() as session:
            found = service.get_tenant_by_slug(session, tenant)
            if organization is not None or clear:
                parent = service.get_tenant_by_slug(session, organization) if organization is not None else None
                service.set_organization(session, found, parent)
            parent = session.get(type(found), found.organization_id) if found.organization_id else None
            typer.echo(f"{tenant} is a team of {parent.slug}" if parent else f"{tenant} belongs to no organization")


@tenants_app.command("shadow-corrections")
def tenants_shadow_corrections(
    tenant: Annotated[str, typer.Option(help="Tenant slug")],
    count: Annotated[int | None, typer.Argument(help="Live corrections to decide a shadow on; none: show it")] = None,
    clear: Annotated[
        bool, typer.Option(help="Promote candidates at once again (a running shadow is rejected)")
    ] = False,
) -> None:
    """Show or set how many live corrections a candidate that passed the gate is compared on, in
    shadow beside the champion, before it is promoted or rejected."""
    from training import shadow

    if count is not None and clear:
        raise typer.BadParameter("give a number or --clear, not both")
    with _reported():
        with session_scope() as session:
            found = service.get_tenant_by_slug(session, tenant)
            if count is not None or clear:
                shadow.set_corrections(session, found, count, actor="cli")
            if found.shadow_corrections is None:
                typer.echo(f"{tenant}: a candidate that passes the gate is promoted at once")
            else:
                typer.echo(
                    f"{tenant}: a candidate that passes the gate drafts in shadow until "
                    f"{found.shadow_corrections} corrections are scored"
                )


@shadow_app.command("status")
def shadow_status(tenant: Annotated[str, typer.Option(help="Tenant slug")]) -> None:
    """The shadow's live comparison with the champion, and the last shadow decided."""
    from training import shadow

    with _reported():
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
    tenant: Annotated[str, typer.Option(help="Tenant slug")],
    role: Annotated[Role, typer.Option(help="agent drafts; reviewer reviews; admin manages")],
    name: Annotated[str, typer.Option(help="What the key is for")],
) -> None:
    """Create an API key. The key is printed once; only its hash is stored."""
    with _reported():
        with session_scope() as session:
            key, raw_key = service.create_api_key(
                session, service.get_tenant_by_slug(session, tenant), name=name, role=role
            )
            typer.echo(f"created {key.role} key {key.id} for {tenant}; store it now, it is not shown again:")
            typer.echo(raw_key)


@keys_app.command("revoke")
def keys_revoke(tenant: Annotated[str, typer.Option(help="Tenant slug")], key_id: int) -> None:
    """Revoke an API key by id."""
    with _reported():
        with session_scope() as session:
            service.revoke_api_key(session, service.get_tenant_by_slug(session, tenant).id, key_id)
            typer.echo(f"revoked key {key_id}")


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve the HTTP API (docs at /docs). Each worker process loads the base model once."""
    import uvicorn

    from core.metrics import MULTIPROC_DIR

    with tempfile.TemporaryDirectory(prefix="draftloop-metrics-") as folder:
        if workers > 1:  # they share the port: each writes its metrics to files in this folder, and
            os.environ.setdefault(MULTIPROC_DIR, folder)  # a scrape of any of them answers the sum of all
        uvicorn.run("api.app:create_app", factory=True, host=host, port=port, workers=workers)


def _parse_overrides(values: list[str]) -> dict:
    overrides = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r}: use NAME=VALUE, e.g. learning_rate=1e-3")
        try:
            overrides[name] = json.loads(raw)
        except ValueError:
            overrides[name] = raw
    return overrides


@app.command()
def train(
    tenant: Annotated[str, typer.Option(help="Tenant slug")],
    set_: Annotated[list[str], typer.Option("--set", help="Override a training setting, NAME=VALUE")] = [],  # noqa: B006
) -> None:
    """Train, evaluate and gate a new adapter now, in this process, showing progress."""
    from training.pipeline import execute_run
    from training.runs import create_run

    with _reported():
        with session_scope() as session:
            tenant_id = service.get_tenant_by_slug(session, tenant).id
            run_id = create_run(
                session, tenant_id, trigger="cli", requested_by="cli", overrides=_parse_overrides(set_)
            ).id
        typer.echo(f"run {run_id} for {tenant}")
        execute_run(run_id, get_settings(), echo=typer.echo)
    typer.echo(f"report: {get_settings().reports_dir / f'run-{run_id}'}")


@app.command("eval")
def evaluate(tenant: Annotated[str, typer.Option(help="Tenant slug")]) -> None:
    """Score the base model and the champion on the current held-out set, and plot every version's scores."""
    from training.tenant_report import evaluate_tenant

    with _reported():
        evaluate_tenant(tenant, get_settings(), echo=typer.echo)


@adapters_app.command("list")
def adapters_list(tenant: Annotated[str, typer.Option(help="Tenant slug")]) -> None:
    """Every adapter version with its status and held-out scores."""
    from training import compose, registry

    with session_scope() as session:
        rows = registry.list_adapters(session, service.get_tenant_by_slug(session, tenant).id)
        typer.echo(f"{'version':>7}  {'status':<9}  {'scale':>5}  {'NLL':>6}  {'chrF':>5}  {'run':>4}  created")
        for a in rows:
            nll, chrf = a.metrics.get("nll", float("nan")), a.metrics.get("chrf", float("nan"))
            created = a.created_at.strftime("%Y-%m-%d %H:%M")
            combined = ""
            if a.composition:
                combined = f"  combined: {compose.describe(a.composition)} ({a.composition['method']})"
            typer.echo(
                f"{a.version:>7}  {a.status:<9}  {a.scale:>5g}  {nll:>6.3f}  {chrf:>5.1f}  {a.training_run_id or '':>4}"
                f"  {created}{combined}"
            )


@adapters_app.command("promote")
def adapters_promote(
    tenant: Annotated[str, typer.Option(help="Tenant slug")],
    version: Annotated[int, typer.Option(help="Adapter version to make the champion")],
    reason: Annotated[str, typer.Option(help="Why, for the audit log")],
) -> None:
    """Make a version the champion (the gate is bypassed: the reason is recorded)."""
    from training import registry

    with _reported():
        with session_scope() as session:
            tenant_id = service.get_tenant_by_slug(session, tenant).id
            adapter = registry.get_adapter(session, tenant_id, version=version)
            registry.promote(session, get_settings(), adapter, actor="cli", reason=reason)
        typer.echo(f"version {version} is now the champion of {tenant}")


@adapters_app.command("rollback")
def adapters_rollback(
    tenant: Annotated[str, typer.Option(help="Tenant slug")],
    reason: Annotated[str, typer.Option(help="Why, for the audit log")],
) -> None:
    """Reject the champion and restore the previous one (or the bare base model)."""
    from training import registry

    with _reported():
        with session_scope() as session:
            restored = registry.rollback(
                session, service.get_tenant_by_slug(session, tenant).id, actor="cli", reason=reason
            )
            typer.echo(f"{tenant} now drafts with " + (f"version {restored.version}" if restored else "the base model"))


@adapters_app.command("combine")
def adapters_combine(
    tenant: Annotated[str, typer.Option(help="The team's slug")],
    organization_weight: Annotated[float, typer.Option(help="In (0, 2]")] = 0.5,
    team_weight: Annotated[float, typer.Option(help="In (0, 2]")] = 0.5,
    method: Annotated[str, typer.Option(help="cat: exact, rank r1 + r2; linear: rank r, approximate")] = "cat",
    organization_version: Annotated[int | None, typer.Option(help="Default: the organization's champion")] = None,
    team_version: Annotated[int | None, typer.Option(help="Default: the team's champion")] = None,
) -> None:
    """Combine the organization's adapter with the team's into a new version of the team, then
    evaluate and gate it like a trained candidate, now, in this process."""
    from training import compose
    from training.pipeline import execute_run
    from training.runs import create_run

    if method not in ("cat", "linear"):
        raise typer.BadParameter(f"method must be cat or linear, not {method!r}")
    settings = get_settings()
    with _reported():
        with session_scope() as session:
            team = service.get_tenant_by_slug(session, tenant)
            composition = compose.plan(
                session,
                settings,
                team,
                method=method,
                organization_weight=organization_weight,
                team_weight=team_weight,
                organization_version=organization_version,
                team_version=team_version,
            )
            run_id = create_run(session, team.id, trigger="cli", requested_by="cli", composition=composition).id
        typer.echo(f"run {run_id} for {tenant}")
        execute_run(run_id, settings, echo=typer.echo)


@adapters_app.command("export")
def adapters_export(
    tenant: Annotated[str, typer.Option(help="Tenant slug")],
    version: Annotated[int, typer.Option(help="Adapter version to export")],
    format_: Annotated[
        ExportFormat,
        typer.Option("--format", help="peft: the adapter; merged: base + adapter (transformers); gguf: for llama.cpp"),
    ],
    out: Annotated[Path, typer.Option(help="Folder to write: new or empty")],
    dtype: Annotated[GgufDtype, typer.Option(help="The GGUF file's weights")] = GgufDtype.float16,
) -> None:
    """Write a version for other tools (PEFT, vLLM, transformers, llama.cpp, Ollama), with a model
    card (README.md) of its base model, datasets, hyper-parameters, scores and the gate's decision."""
    from training.export import export_source, write_export

    settings = get_settings()
    with _reported():
        with session_scope() as session:
            source = export_source(session, settings, service.get_tenant_by_slug(session, tenant).id, version)
        folder = write_export(source, settings, format_, out, dtype=dtype)
    typer.echo(f"{tenant} v{version} ({format_}) -> {folder}: " + ", ".join(sorted(p.name for p in folder.iterdir())))


@datasets_app.command("export")
def datasets_export(
    tenant: Annotated[str, typer.Option(help="Tenant slug")],
    out: Annotated[Path, typer.Option(help="JSONL file to write")],
    split: Annotated[Split, typer.Option(help="train or heldout")] = Split.train,
    kind: Annotated[
        SnapshotKind, typer.Option(help="sft: prompt/completion rows; preference: prompt/chosen/rejected pairs")
    ] = SnapshotKind.sft,
) -> None:
    """Write a split's SFT rows (or the train split's preference pairs) as JSONL that
    datasets.load_dataset("json") and TRL's trainers read as they are."""
    from agent.base_model import load_tokenizer
    from training.dataset import tenant_dataset, write_jsonl

    settings = get_settings()
    with _reported():
        with session_scope() as session:
            found = service.get_tenant_by_slug(session, tenant)
            dataset = tenant_dataset(session, found, split, load_tokenizer(settings), settings, kind=kind)
    write_jsonl(dataset.rows, out)
    typer.echo(f"{len(dataset.rows)} rows (dropped {dataset.dropped or 'none'}), hash {dataset.content_hash} -> {out}")


@app.command()
def worker(
    queue: Annotated[
        str,
        typer.Option(help="training: trains runs, one at a time, each in a fresh process; scheduling: beat's tasks"),
    ],
    loglevel: str = "INFO",
) -> None:
    """Run a Celery worker for one queue. Run one of each: a training run never delays the scheduling."""
    from training.celery_app import WORKER_OPTIONS
    from training.celery_app import app as celery_app

    if queue not in WORKER_OPTIONS:
        raise typer.BadParameter(f"{queue!r}: one of {', '.join(WORKER_OPTIONS)}", param_hint="--queue")
    options = ["--queues", queue, "--hostname", f"{queue}@%h", *WORKER_OPTIONS[queue]]
    celery_app.worker_main(["worker", "--loglevel", loglevel, *options])


@app.command()
def beat(loglevel: str = "INFO") -> None:
    """Run the Celery beat scheduler: finds tenants due a run, and sweeps lost or stalled runs."""
    from training.celery_app import app as celery_app

    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    schedule = str(settings.var_dir / "celerybeat-schedule")
    celery_app.start(["beat", "--loglevel", loglevel, "--schedule", schedule])


@app.command()
def demo() -> None:
    """The whole loop on the embedded defaults, with real workers and beat (about 10 minutes)."""
    from api.demo import run_demo

    run_demo()


if __name__ == "__main__":
    app()
