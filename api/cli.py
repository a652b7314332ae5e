"""The `draftloop` command line: the app, its service commands (db, serve, worker, beat, demo) and
the command groups of api/cli_tenants.py (tenants, keys, shadow) and api/cli_runs.py (train,
eval, adapters, datasets)."""

import os
import tempfile
from typing import Annotated

import typer

from api import cli_runs
from api.cli_tenants import keys_app, shadow_app, tenants_app
from core.settings import get_settings

app = typer.Typer(help="draftloop: draft email replies and learn from reviewers' corrections.", no_args_is_help=True)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(cli_runs.adapters_app, name="adapters")
app.add_typer(cli_runs.datasets_app, name="datasets")
app.add_typer(shadow_app, name="shadow")


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the migrations to the configured database (DRAFTLOOP_DATABASE_URL)."""
    from migrations import upgrade

    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url, revision)
    typer.echo(f"database at {revision}: {settings.resolved_database_url}")


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve the HTTP API (docs at /docs). Each worker process loads the base model once."""
    import uvicorn

    from core.metrics import MULTIPROC_DIR

    with tempfile.TemporaryDirectory(prefix="draftloop-metrics-") as folder:
        if workers > 1:  # they share the port: each writes its metrics to files in this folder, and
            os.environ.setdefault(MULTIPROC_DIR, folder)  # a scrape of any of them answers the sum of all
        uvicorn.run("api.app:create_app", factory=True, host=host, port=port, workers=workers)


# train and eval are commands of the app itself, between serve and worker in its help
app.command()(cli_runs.train)
app.command("eval")(cli_runs.evaluate)


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
