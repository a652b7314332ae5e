"""The command line's training groups: `train` and `eval` (registered on the app by api/cli.py),
`adapters`, `datasets`."""

import json
from pathlib import Path
from typing import Annotated, get_args

import typer

from api.cli_common import TenantSlug, reported
from core.db import session_scope
from core.settings import get_settings
from feedback import service
from feedback.models import Split
from training.models import ExportFormat, GgufDtype, SnapshotKind

adapters_app = typer.Typer(help="A tenant's adapter versions.", no_args_is_help=True)
datasets_app = typer.Typer(help="Training datasets built from corrections.", no_args_is_help=True)


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


def train(
    tenant: TenantSlug,
    set_: Annotated[list[str], typer.Option("--set", help="Override a training setting, NAME=VALUE")] = [],  # noqa: B006
) -> None:
    """Train, evaluate and gate a new adapter now, in this process, showing progress."""
    from training.pipeline import execute_run
    from training.runs import create_run

    with reported():
        with session_scope() as session:
            tenant_id = service.get_tenant_by_slug(session, tenant).id
            run_id = create_run(
                session, tenant_id, trigger="cli", requested_by="cli", overrides=_parse_overrides(set_)
            ).id
        typer.echo(f"run {run_id} for {tenant}")
        execute_run(run_id, get_settings(), echo=typer.echo)
    typer.echo(f"report: {get_settings().reports_dir / f'run-{run_id}'}")


def evaluate(tenant: TenantSlug) -> None:
    """Score the base model and the champion on the current held-out set, and plot every version's scores."""
    from training.tenant_report import evaluate_tenant

    with reported():
        evaluate_tenant(tenant, get_settings(), echo=typer.echo)


@adapters_app.command("list")
def adapters_list(tenant: TenantSlug) -> None:
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
    tenant: TenantSlug,
    version: Annotated[int, typer.Option(help="Adapter version to make the champion")],
    reason: Annotated[str, typer.Option(help="Why, for the audit log")],
) -> None:
    """Make a version the champion (the gate is bypassed: the reason is recorded)."""
    from training import registry

    with reported():
        with session_scope() as session:
            tenant_id = service.get_tenant_by_slug(session, tenant).id
            adapter = registry.get_adapter(session, tenant_id, version=version)
            registry.promote(session, get_settings(), adapter, actor="cli", reason=reason)
        typer.echo(f"version {version} is now the champion of {tenant}")


@adapters_app.command("rollback")
def adapters_rollback(
    tenant: TenantSlug,
    reason: Annotated[str, typer.Option(help="Why, for the audit log")],
) -> None:
    """Reject the champion and restore the previous one (or the bare base model)."""
    from training import registry

    with reported():
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

    methods = get_args(compose.Method)
    if method not in methods:
        raise typer.BadParameter(f"method must be {' or '.join(methods)}, not {method!r}")
    settings = get_settings()
    with reported():
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
    tenant: TenantSlug,
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
    with reported():
        with session_scope() as session:
            source = export_source(session, settings, service.get_tenant_by_slug(session, tenant).id, version)
        folder = write_export(source, settings, format_, out, dtype=dtype)
    typer.echo(f"{tenant} v{version} ({format_}) -> {folder}: " + ", ".join(sorted(p.name for p in folder.iterdir())))


@datasets_app.command("export")
def datasets_export(
    tenant: TenantSlug,
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
    with reported():
        with session_scope() as session:
            found = service.get_tenant_by_slug(session, tenant)
            dataset = tenant_dataset(session, found, split, load_tokenizer(settings), settings, kind=kind)
    write_jsonl(dataset.rows, out)
    typer.echo(f"{len(dataset.rows)} rows (dropped {dataset.dropped or 'none'}), hash {dataset.content_hash} -> {out}")
