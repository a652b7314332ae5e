"""The main job: the whole loop on the embedded defaults (SQLite, the local Redis, the embedded
base model) with real Celery workers (training and scheduling) and beat.

A fresh demo tenant; the base model drafts replies to the sample tenant's incoming emails; the
reviewers' corrections go in through the API; beat notices the new corrections and queues a
run; the worker trains, evaluates and gates it; the held-out emails are drafted again with the
promoted adapter and shown beside the base model's drafts.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import typer

DEMO_DIR = Path("var/demo")
HISTORY_TOKENS = 32  # the base model's drafts of the history: only their corrections are trained on
SHOWN = 3  # held-out emails drafted again at the end
# Part of the 300-email sample, so that the demo ends in about ten minutes on 2 CPU cores; the
# whole sample is trained by `make bench` (bench/train_sample.py).
DEMO_EMAILS = 60
HELDOUT_FRACTION = 0.25  # of 60: enough held-out emails for the gate (at least 10)


def _env() -> dict[str, str]:
    """The demo's own folder, database and Redis database, and a short schedule."""
    return {
        "DRAFTLOOP_VAR_DIR": str(DEMO_DIR),
        "DRAFTLOOP_DATABASE_URL": f"sqlite:///{(DEMO_DIR / 'draftloop.db').resolve()}",
        "DRAFTLOOP_MODEL_CACHE_DIR": os.environ.get("DRAFTLOOP_MODEL_CACHE_DIR", "var/models"),
        "DRAFTLOOP_REDIS_URL": os.environ.get("DRAFTLOOP_DEMO_REDIS_URL", "redis://127.0.0.1:6379/1"),
        "DRAFTLOOP_SCHEDULE_EVERY_S": "5",
        "DRAFTLOOP_SWEEP_EVERY_S": "30",
        "DRAFTLOOP_MIN_NEW_CORRECTIONS": "30",
        "DRAFTLOOP_HELDOUT_FRACTION": str(HELDOUT_FRACTION),
        # Fewer greedy drafts in the evaluation (chrF, loops and style; the gate reads NLL and loops),
        # as long as the agent's so that they reach the sign-off.
        "DRAFTLOOP_EVAL_DRAFT_EXAMPLES": "4",
    }


def _show(title: str, text: str, width: int = 100) -> None:
    typer.secho(title, bold=True)
    for line in text.strip().splitlines() or [""]:
        typer.echo(textwrap.indent(textwrap.fill(line, width) if line else "", "    "))


def _start(log: Path, *args: str) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "api.cli", *args], stdout=handle, stderr=subprocess.STDOUT)


def run_demo() -> None:
    started = time.perf_counter()
    phases: dict[str, float] = {}  # phase -> seconds, in order

    def mark(phase: str) -> None:
        phases[phase] = round(time.perf_counter() - started - sum(phases.values()), 1)

    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir(parents=True)
    os.environ.update(_env())

    # Imported after the environment is set: settings are read once.
    from fastapi.testclient import TestClient

    from api.app import create_app
    from core.db import session_scope
    from core.settings import get_settings
    from feedback import service
    from feedback.models import Role
    from feedback.samples import load_sample_tenant
    from migrations import upgrade
    from training.celery_app import SCHEDULING_QUEUE, TRAINING_QUEUE
    from training.celery_app import app as celery_app

    settings = get_settings()
    upgrade(settings.resolved_database_url)
    celery_app.control.purge()
    processes = [
        _start(DEMO_DIR / f"worker-{queue}.log", "worker", "--queue", queue)
        for queue in (TRAINING_QUEUE, SCHEDULING_QUEUE)
    ] + [_start(DEMO_DIR / "beat.log", "beat")]
    typer.echo(f"workers and beat started (logs in {DEMO_DIR}/); database {settings.resolved_database_url}")
    mark("start")
    try:
        sample = load_sample_tenant()
        sample = dataclasses.replace(sample, emails=sample.emails[:DEMO_EMAILS])
        with session_scope() as session:
            tenant = service.create_tenant(
                session, name=sample.name, slug=sample.slug, instructions=sample.instructions
            )
            keys = {
                role: service.create_api_key(session, tenant, name=f"demo {role}", role=role)[1]
                for role in (Role.agent, Role.reviewer, Role.admin)
            }
        agent, reviewer, admin = ({"X-API-Key": keys[role]} for role in (Role.agent, Role.reviewer, Role.admin))
        client = TestClient(create_app())

        typer.secho(f"\n1. The base model drafts replies to {len(sample.emails)} incoming emails", bold=True)
        typer.echo(
            f"   (the first {DEMO_EMAILS} of the sample tenant's 300, so that the demo ends in minutes; "
            "`make bench` trains on all of them)"
        )
        drafts = {}
        for start in range(0, len(sample.emails), 16):
            batch = sample.emails[start : start + 16]
            emails = [{"sender": e.sender, "subject": e.subject, "body": e.body} for e in batch]
            response = client.post(
                "/v1/drafts/batch", json={"emails": emails, "max_new_tokens": HISTORY_TOKENS}, headers=agent
            )
            response.raise_for_status()
            drafts.update({e.id: d for e, d in zip(batch, response.json(), strict=True)})
            typer.echo(f"   drafted {len(drafts)}/{len(sample.emails)}  ({time.perf_counter() - started:.0f}s)")

        mark("drafting the history")
        typer.secho("\n2. Reviewers submit their corrections through the API", bold=True)
        splits = {"train": 0, "heldout": 0}
        heldout = []
        for email in sample.emails:
            draft = drafts[email.id]
            response = client.post(
                f"/v1/drafts/{draft['id']}/correction",
                json={"verdict": "edited", "final_text": email.reply},
                headers=reviewer | {"Idempotency-Key": f"demo-{email.id}"},
            )
            response.raise_for_status()
            splits[response.json()["split"]] += 1
            if response.json()["split"] == "heldout":
                heldout.append(email)
        typer.echo(f"   {splits['train']} corrections for training, {splits['heldout']} held out for evaluation")

        typer.secho(
            f"\n3. Beat queues a run (every {settings.schedule_every_s:.0f}s it looks for tenants due one)", bold=True
        )
        mark("corrections")
        run = _wait_for_run(client, admin)
        mark("until beat queues the run")
        typer.echo(f"   run {run['id']} queued by {run['trigger']}; the worker trains it with QLoRA:")
        run = _follow(client, admin, run["id"], started, timeout=settings.run_time_limit_s, mark=mark)
        mark("evaluation and gate")

        typer.secho(f"\n4. The gate: {run['status']}", bold=True)
        if run["report"]:
            summary = run["report"]["summary"]
            for name, scores in summary.items():
                typer.echo(
                    f"   {name:<10} held-out NLL {scores['nll']:.3f}   chrF {scores['chrf']:.1f}   "
                    f"drafts that loop {scores['loop_rate']:.0%}   house style {scores['style']:.0%}"
                )
            typer.echo(f"   on {run['report']['heldout_examples']} held-out corrections; {run['decision_reason']}")
            general, guard = run["report"]["regression_examples"], run["report"]["decision"]["forgetting"]
            typer.echo(f"   forgetting guard, on {general} general emails: {guard['verdict']}")
        else:
            typer.echo(f"   {run['decision_reason'] or run['error']}")

        if run["status"] == "promoted":
            typer.secho("\n5. Held-out emails drafted again, now with the promoted adapter", bold=True)
            emails = [{"sender": e.sender, "subject": e.subject, "body": e.body} for e in heldout[:SHOWN]]
            after = client.post("/v1/drafts/batch", json={"emails": emails}, headers=agent)
            after.raise_for_status()
            for email, new in zip(heldout[:SHOWN], after.json(), strict=True):
                typer.secho(f"\n--- {email.subject}  (from {email.sender})", fg="cyan", bold=True)
                _show("incoming:", email.body)
                _show(f"before, base model (first {HISTORY_TOKENS} tokens):", drafts[email.id]["draft_text"])
                _show(f"after, adapter v{_version(client, admin, new['adapter_id'])}:", new["draft_text"])
                _show("what the reviewer wrote:", email.reply)

            mark("drafting again")

        reports = settings.reports_dir / f"run-{run['id']}"
        typer.secho("\nWhere to look", bold=True)
        typer.echo(f"   report: {reports / 'report.json'}")
        typer.echo(f"   plots:  {reports / 'loss.png'}, {reports / 'heldout.png'}")
        typer.echo(f"   the demo's database: {settings.resolved_database_url}")
        typer.echo(
            f"   every version's scores as a plot: DRAFTLOOP_VAR_DIR={DEMO_DIR} draftloop eval --tenant northwind"
        )
        typer.echo(f"   the reviewer's pages: DRAFTLOOP_VAR_DIR={DEMO_DIR} draftloop serve, then open")
        typer.echo(f"   http://127.0.0.1:8000/web/ and sign in with the demo's admin key {keys[Role.admin]}")
        typer.echo(f"   (or its reviewer key {keys[Role.reviewer]}, which sees the queue but not the dashboard)")
        total = round(time.perf_counter() - started, 1)
        typer.echo(f"\nThe whole loop took {total:.0f}s: " + _phases(phases))
        (DEMO_DIR / "phases.json").write_text(json.dumps(phases | {"total": total}))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_for_run(client, headers, timeout=120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.get("/v1/runs", headers=headers).json()
        if runs:
            return runs[0]
        time.sleep(1)
    raise RuntimeError(f"no run was queued within {timeout}s: is Redis up, and did beat start? See {DEMO_DIR}/")


def _phases(phases: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.0f}s" for name, seconds in phases.items())


def _follow(client, headers, run_id: int, started: float, timeout: float, mark) -> dict:
    """Print the run's progress until the gate has decided; mark when training ends."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        run = client.get(f"/v1/runs/{run_id}", headers=headers).json()
        shown = (run["status"], run["step"])
        if shown != last:
            if last is not None and last[0] == "running" and run["status"] != "running":
                mark("training (with the worker's model load)")
            last = shown
            loss = f"  loss {run['loss']:.3f}" if run["loss"] is not None else ""
            typer.echo(
                f"   {run['status']:<10} step {run['step']}/{run['total_steps']}{loss}"
                f"  ({time.perf_counter() - started:.0f}s)"
            )
        if run["status"] in ("promoted", "shadowed", "rejected", "failed"):
            return run
        time.sleep(2)
    raise RuntimeError(f"run {run_id} did not finish within {timeout}s; see {DEMO_DIR}/worker-training.log")


def _version(client, headers, adapter_id: int | None) -> str:
    adapters = client.get("/v1/adapters", headers=headers).json()
    return next((str(a["version"]) for a in adapters if a["id"] == adapter_id), "?")
