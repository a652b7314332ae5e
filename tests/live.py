"""A live draftloop for tests and benchmarks: the API (`draftloop serve`), the Celery workers
(`draftloop worker --queue training`, `--queue scheduling`) and beat as real subprocesses, on
a database of their own (a fresh SQLite file or PostgreSQL database, migrated) and a Redis of
their own, with helpers to kill them (-9) and start them again.

    with Live(fresh_database("postgres", folder), redis_url, folder, base_model=...) as live:
        live.start_api()
        keys = live.tenant()
        httpx.post(live.url + "/v1/drafts", json=..., headers=keys.agent)
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import httpx
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from core.db import make_engine
from feedback.models import Role
from migrations import upgrade
from tests.db import POSTGRES_SERVER
from tests.factories import make_key, make_tenant

REPO = Path(__file__).resolve().parents[1]
# The embedded model's converted copy, shared with the test suite (tests/conftest.py): the GGUF
# conversion (~15 s) happens once per checkout, not once per run.
MODEL_CACHE_DIR = REPO / "var" / "models"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise TimeoutError(f"{what}: not after {timeout:.0f} s")


# Databases ---------------------------------------------------------------------------------


def _postgres_admin():
    return create_engine(f"{POSTGRES_SERVER}/postgres", isolation_level="AUTOCOMMIT")


def fresh_database(kind: str, folder: Path) -> str:
    """A new database at the latest migration: a SQLite file in folder, or a PostgreSQL
    database named draftloop_faults_<random>. Returns its URL."""
    if kind == "sqlite":
        url = f"sqlite:///{folder / f'draftloop-{uuid.uuid4().hex[:8]}.db'}"
    elif kind == "postgres":
        name = f"draftloop_faults_{uuid.uuid4().hex[:10]}"
        admin = _postgres_admin()
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
        admin.dispose()
        url = f"{POSTGRES_SERVER}/{name}"
    else:
        raise ValueError(f"database kind {kind!r}: sqlite or postgres")
    upgrade(url)
    return url


def drop_database(url: str) -> None:
    if url.startswith("postgresql"):
        admin = _postgres_admin()
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {make_url(url).database} WITH (FORCE)"))
        admin.dispose()


def terminate_connections(url: str) -> int:
    """Drop every connection to this PostgreSQL database (as a failover or a restart would);
    returns how many were ended."""
    admin = _postgres_admin()
    with admin.connect() as connection:
        ended = connection.execute(
            text(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": make_url(url).database},
        ).scalar_one()
    admin.dispose()
    return ended


# Processes ---------------------------------------------------------------------------------


def kill9(process: subprocess.Popen) -> None:
    """kill -9 the process and everything it started (a worker's pool child too), as a crash would."""
    if process.returncode is None:  # not reaped yet: its process group id is still its own
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group, then kill -9 it if it has not ended after timeout seconds."""
    if process.returncode is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            kill9(process)


def spawn(command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A process in its own process group (so kill9 takes its children), output appended to log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


class RedisServer:
    """A redis-server of the caller's own on a free port, without persistence: a restart loses
    every message on it, as a Redis without a disk would."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = spawn([*command, "--dir", str(self.folder)], self.folder / "redis.log")
        wait_until(self._answers, 10, f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None:
            kill9(self.process)
            self.process = None

    def restart(self, down_s: float = 1.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()


@dataclass
class Keys:
    """A tenant's id and raw keys of every role, as request headers."""

    tenant_id: int
    agent: dict
    reviewer: dict
    admin: dict


@dataclass
class Live:
    """The service's processes on one database and Redis, with settings as DRAFTLOOP_* values."""

    database_url: str
    redis_url: str
    var_dir: Path
    base_model: str = "embedded"
    settings: dict = field(default_factory=dict)  # e.g. {"stale_after_s": 5}: DRAFTLOOP_STALE_AFTER_S=5
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict:
        env = {name: value for name, value in os.environ.items() if not name.startswith("DRAFTLOOP_")}
        values = {
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "var_dir": self.var_dir,
            "base_model": self.base_model,
            "model_cache_dir": MODEL_CACHE_DIR,
        } | self.settings
        env |= {f"DRAFTLOOP_{name.upper()}": str(value) for name, value in values.items()}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return env

    def draftloop(self, name: str, *args: str) -> subprocess.Popen:
        """`draftloop <args>` in the background, logged to var_dir/logs/<name>.log."""
        process = spawn([sys.executable, "-m", "api.cli", *args], self.var_dir / "logs" / f"{name}.log", self.env)
        self.processes.append(process)
        return process

    def start_api(self, timeout: float = 120, workers: int = 1) -> subprocess.Popen:
        """`draftloop serve` on self.port; returns once /readyz answers 200."""
        process = self.draftloop("api", "serve", "--port", str(self.port), "--workers", str(workers))

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"the API exited with {process.returncode}; see {self.var_dir}/logs/api.log")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, f"the API on port {self.port}")
        return process

    def start_worker(self, queue: str) -> subprocess.Popen:
        """`draftloop worker --queue <queue>` (training or scheduling), logged to worker-<queue>.log."""
        return self.draftloop(f"worker-{queue}", "worker", "--queue", queue, "--loglevel", "WARNING")

    def start_beat(self) -> subprocess.Popen:
        return self.draftloop("beat", "beat", "--loglevel", "WARNING")

    def logged_errors(self) -> list[str]:
        """The distinct exceptions the processes logged (the last line of each traceback)."""
        found = set()
        for log in sorted((self.var_dir / "logs").glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if re.match(r"^[\w.]+(Error|Exception|Exit|Timeout)\b.*:", line):
                    found.add(f"{log.name}: {line[:300]}")
        return sorted(found)

    @cached_property
    def engine(self) -> Engine:
        """The test's own engine on the service's database."""
        return make_engine(self.database_url)

    def tenant(self, instructions: str = "You answer for a bicycle shop.") -> Keys:
        """A new tenant with an agent, a reviewer and an admin key, written straight to the database."""
        with Session(self.engine, expire_on_commit=False) as session:
            tenant = make_tenant(session, instructions=instructions)
            headers = [
                {"X-API-Key": make_key(session, tenant, role)[1]} for role in (Role.agent, Role.reviewer, Role.admin)
            ]
            session.commit()
        return Keys(tenant.id, *headers)

    def close(self) -> None:
        for process in self.processes:
            stop(process)
        self.processes.clear()
        self.engine.dispose()

    def __enter__(self) -> "Live":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tiny_base_model(folder: Path) -> Path:
    """The tests' tiny random Llama (tests/factories.py) saved in folder, for scripts outside pytest."""
    from agent.base_model import load_tokenizer
    from core.settings import Settings
    from tests.factories import save_tiny_llama

    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        save_tiny_llama(load_tokenizer(Settings(model_cache_dir=MODEL_CACHE_DIR)), folder)
    return folder
