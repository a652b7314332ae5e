"""Many tenants on one base model, over HTTP: 8 tenants, each with its own champion adapter
(rank 16 on every projection, random values), drafting concurrently through `POST /v1/drafts`
against `draftloop serve`; then the same load from 8 tenants without adapters (the base model).

For concurrency 1, 4 and 16: aggregate new tokens/s, and p50/p95 request latency; the ratio of
mixed-adapter to base-only throughput. Each group runs three times, alternated (mixed, base,
base, mixed, mixed, base), and its figures are those of its runs together: this machine's speed
drifts by 15-25% within minutes, and one run each, mixed first, measured the drift as much as the
adapters. Each pair's own ratio (a mixed run over the base run beside it) is saved beside the
group's, to show how far one ratio moves. Each request drafts a reply to a different
sample email with up to 64 new tokens (prefill included in every figure). Then the cost of a
version the server has never seen: a tenant's first one-token draft against the same draft again.

With --vllm, the same load also goes through the remote backend: `draftloop serve` drafting on
a real vLLM (the CPU build, `make vllm`) on the same machine, both in float32 on all cores, one
after the other; the unseen version's cost then includes publishing it for vLLM's resolver.

Run: .venv/bin/python -m bench.serving [--vllm]   (about 5 minutes on 2 CPU cores; over 15 with --vllm)
"""

import argparse
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
    """Two groups of 8 tenants with agent keys: `mixed` with a champion adapter each, `base`
    without; and `unseen`: one tenant per server, whose champion no server has drafted with yet."""
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
    keys: dict[str, list[str]] = {"mixed": [], "base": [], "unseen": []}
    with session_scope() as session:
        for group in keys:
            for i in range(TENANTS if group != "unseen" else 2):
                tenant = service.create_tenant(session, name=f"{group} {i}", slug=f"{group}-{i}", instructions="")
                keys[group].append(service.create_api_key(session, tenant, name="bench", role=Role.agent)[1])
                if group != "base":
                    trained = random_adapter(model, WORK / f"trained-{group}-{i}", seed=i + 100 * (group == "unseen"))
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


def serve(env: dict) -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port)],
        env=os.environ | ENV | env,
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
    """`requests` drafts, `concurrency` at a time, tenants taken in turn: each one's new tokens and
    latency, and the wall time of the run."""
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
    return {"tokens": tokens, "latencies": latencies, "wall_s": wall}


def rate(run: dict) -> float:
    """A run's new tokens per second."""
    return sum(run["tokens"]) / run["wall_s"]


def summary(runs: list[dict]) -> dict:
    """Runs of one group together: aggregate tokens/s over their summed wall time, latencies pooled."""
    tokens = [n for run in runs for n in run["tokens"]]
    latencies = sorted(t for run in runs for t in run["latencies"])
    return {
        "requests": len(tokens),
        "tokens_per_s": round(sum(tokens) / sum(run["wall_s"] for run in runs), 1),
        "mean_new_tokens": round(statistics.mean(tokens), 1),
        "latency_p50_s": round(statistics.median(latencies), 2),
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
    }


async def first_draft_cost(url: str, key: str, email: dict) -> dict:
    """A one-token draft of a tenant whose version this server has never seen, then the same again."""
    async with httpx.AsyncClient(timeout=600) as http:
        times = []
        for _ in range(2):
            started = time.perf_counter()
            response = await http.post(
                f"{url}/v1/drafts", json=email | {"max_new_tokens": 1}, headers={"X-API-Key": key}
            )
            response.raise_for_status()
            times.append(time.perf_counter() - started)
    return {
        "first_s": round(times[0], 3),
        "again_s": round(times[1], 3),
        "load_ms": round(1000 * (times[0] - times[1])),
    }


def measure(env: dict, keys: dict[str, list[str]], unseen_key: str, emails: list[dict], label: str) -> dict:
    """The whole load against one server started with env."""
    server, url = serve(env)
    figures: dict = {}
    try:
        asyncio.run(load(url, keys["mixed"], emails, 8, 8))  # warm-up: every adapter loaded once
        for concurrency in CONCURRENCY:
            requests = max(8, 2 * concurrency)
            runs: dict[str, list[dict]] = {"mixed": [], "base": []}
            for group in ("mixed", "base", "base", "mixed", "mixed", "base"):  # alternated: drift favours neither
                runs[group].append(asyncio.run(load(url, keys[group], emails, concurrency, requests)))
            row: dict = {group: summary(group_runs) for group, group_runs in runs.items()}
            row["mixed_over_base"] = round(row["mixed"]["tokens_per_s"] / row["base"]["tokens_per_s"], 2)
            # each mixed run over the base run beside it: the spread the machine's drift gives one ratio
            row["each_pair"] = [round(rate(m) / rate(b), 2) for m, b in zip(runs["mixed"], runs["base"], strict=True)]
            figures[f"concurrency_{concurrency}"] = row
            print(label, concurrency, row, flush=True)
        figures["unseen_version"] = asyncio.run(first_draft_cost(url, unseen_key, emails[0]))
        print(label, "unseen version", figures["unseen_version"], flush=True)
    finally:
        server.terminate()
        server.wait(30)
    return figures


def main() -> None:
    from bench.report import save
    from feedback.samples import load_sample_tenant

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm", action="store_true", help="also through the remote backend on a real vLLM")
    with_vllm = parser.parse_args().vllm
    if with_vllm:  # the same precision on both sides
        ENV["DRAFTLOOP_MODEL_DTYPE"] = "float32"
    keys = set_up()
    emails = [{"sender": e.sender, "subject": e.subject, "body": e.body} for e in load_sample_tenant().emails]
    from core.settings import get_settings

    figures: dict = {"tenants": TENANTS, "max_new_tokens": NEW_TOKENS}
    figures["serving_weights"] = get_settings().serving_weights  # DRAFTLOOP_SERVING_WEIGHTS
    figures["local"] = measure({}, keys, keys["unseen"][0], emails, "local")
    if with_vllm:
        figures["vllm"] = measure_vllm(keys, emails)
        figures["vllm_over_local_tokens_per_s"] = {
            f"{c}/{group}": round(
                figures["vllm"][f"concurrency_{c}"][group]["tokens_per_s"]
                / figures["local"][f"concurrency_{c}"][group]["tokens_per_s"],
                2,
            )
            for c in CONCURRENCY
            for group in ("mixed", "base")
        }
    ratios = {c: figures["local"][f"concurrency_{c}"]["mixed_over_base"] for c in CONCURRENCY}
    figures["targets"] = {"mixed_over_base >= 0.9": ratios}
    save("serving-vllm" if with_vllm else "serving", figures)


def measure_vllm(keys: dict[str, list[str]], emails: list[dict]) -> dict:
    from agent.base_model import model_source
    from core.settings import get_settings
    from tests.vllm import VllmServer

    published = WORK / "published"
    model_dir = Path(model_source(get_settings()))
    with VllmServer(
        model_dir, published, WORK / "vllm.log", api_key="bench", max_loras=TENANTS, all_cores=True
    ) as vllm:
        env = {
            "DRAFTLOOP_DRAFTING_BACKEND": "remote",
            "DRAFTLOOP_REMOTE_URL": vllm.url,
            "DRAFTLOOP_BACKEND_API_KEY": "bench",
            "DRAFTLOOP_REMOTE_PUBLISH_DIR": str(published),
        }
        figures = measure(env, keys, keys["unseen"][1], emails, "vllm")
        figures["server"] = {"command": " ".join(vllm.command[1:]), "threads": "all cores"}
    return figures


if __name__ == "__main__":
    main()
