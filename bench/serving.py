"""Many tenants on one base model, over HTTP: 8 tenants, each with its own champion adapter
(rank 16 on every projection, random values), drafting concurrently through `POST /v1/drafts`
against `draftloop serve`; then the same load from 8 tenants without adapters (the base model).

For concurrency 1, 4 and 16: aggregate new tokens/s, and p50/p95 request latency; the ratio of
mixed-adapter to base-only throughput. Each request drafts a reply to a different sample email
with up to 64 new tokens (prefill included in every figure).

Run: .venv/bin/python -m bench.serving   (about 5 minutes on 2 CPU cores)
"""

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CONCURRENCY = (1, 4, 16)
TENANTS = 8
NEW_TOKENS = 64
WORK = Path(tempfile.mkdtemp(prefix="draftloop-serving-"))
ENV = {
    "DRAFTLOOP_VAR_DIR": str(WORK),
    "DRAFTLOOP_MODEL_CACHE_DIR": str(Path("var/models").resolve()),
    "DRAFTLOOP_SECRET_KEY": "bench",
}


def set_up() -> dict[str, list[str]]:
    """Two groups of 8 tenants with agent keys: `mixed` with a champion adapter each, `base` without."""
    os.environ.update(ENV)
    from agent.base_model import fingerprint, load_base_model, model_id, model_source
    from bench.decode import random_adapter
    from core.db import session_scope
    from core.settings import get_settings
    from feedback import service
    from feedback.models import Role
    from migrations import upgrade
    from training import registry

    settings = get_settings()
    upgrade(settings.resolved_database_url)
    model = load_base_model(settings).model
    base_fingerprint = fingerprint(model_source(settings))
    keys: dict[str, list[str]] = {"mixed": [], "base": []}
    with session_scope() as session:
        for group in keys:
            for i in range(TENANTS):
                tenant = service.create_tenant(session, name=f"{group} {i}", slug=f"{group}-{i}", instructions="")
                keys[group].append(service.create_api_key(session, tenant, name="bench", role=Role.agent)[1])
                if group == "mixed":
                    trained = random_adapter(model, WORK / f"trained-{i}", seed=i)
                    adapter = registry.store_candidate(
                        session,
                        settings,
                        tenant_id=tenant.id,
                        trained_dir=trained.path,
                        base_model=model_id(settings),
                        base_fingerprint=base_fingerprint,
                        config={"rank": 16},
                        train_snapshot_id=None,
                        training_run_id=None,
                    )
                    registry.promote(session, settings, adapter, actor="bench", reason="bench")
    return keys


def serve() -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port)],
        env=os.environ | ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError("the server did not start")
        time.sleep(0.5)


async def load(url: str, keys: list[str], emails: list[dict], concurrency: int, requests: int) -> dict:
    """`requests` drafts, `concurrency` at a time, tenants taken in turn."""
    latencies, tokens = [], []
    jobs = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        for i in jobs:
            email = emails[i % len(emails)]
            started = time.perf_counter()
            response = await http.post(
                f"{url}/v1/drafts",
                json=email | {"max_new_tokens": NEW_TOKENS},
                headers={"X-API-Key": keys[i % len(keys)]},
            )
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
            tokens.append(response.json()["tokens_generated"])

    async with httpx.AsyncClient(timeout=600) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": requests,
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "mean_new_tokens": round(statistics.mean(tokens), 1),
        "latency_p50_s": round(statistics.median(latencies), 2),
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
    }


def main() -> None:
    from bench.report import save
    from feedback.samples import load_sample_tenant

    keys = set_up()
    emails = [{"sender": e.sender, "subject": e.subject, "body": e.body} for e in load_sample_tenant().emails]
    server, url = serve()
    figures: dict = {"tenants": TENANTS, "max_new_tokens": NEW_TOKENS}
    try:
        asyncio.run(load(url, keys["mixed"], emails, 8, 8))  # warm-up: every adapter loaded once
        for concurrency in CONCURRENCY:
            requests = max(8, 2 * concurrency)
            row = {group: asyncio.run(load(url, keys[group], emails, concurrency, requests)) for group in keys}
            row["mixed_over_base"] = round(row["mixed"]["tokens_per_s"] / row["base"]["tokens_per_s"], 2)
            figures[f"concurrency_{concurrency}"] = row
            print(concurrency, row, flush=True)
    finally:
        server.terminate()
        server.wait(30)
    ratios = {c: figures[f"concurrency_{c}"]["mixed_over_base"] for c in CONCURRENCY}
    figures["targets"] = {"mixed_over_base >= 0.9": ratios}
    save("serving", figures)


if __name__ == "__main__":
    main()
