"""The load test: REQUESTS draft requests (POST /v1/drafts) sent at once to one live server on
this machine (`draftloop serve` on a fresh SQLite file, the default settings and model). Every
request must be served (201) or shed at once with 429 or 503 and a Retry-After header; none may
be left hanging until the client's timeout, none may be a 500. Reports the served requests'
p50/p95 latency and the counts by status.

    python -m bench.load                                           # make bench-load
    python -m bench.load --requests 20 --base-model <tiny folder>  # a trial
"""

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.live import Live, drop_database, fresh_database


async def send_all(url: str, headers: dict, count: int, max_new_tokens: int | None, timeout: float) -> list[dict]:
    """count requests released together; for each: status (or the client error), seconds, Retry-After."""
    start = asyncio.Event()
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(n: int) -> dict:
            email = {"sender": f"Customer {n} <c{n}@example.com>", "subject": "Order", "body": f"Where is order {n}?"}
            if max_new_tokens:
                email["max_new_tokens"] = max_new_tokens
            await start.wait()
            began = time.perf_counter()
            try:
                response = await client.post("/v1/drafts", json=email, headers=headers)
                status, retry_after = response.status_code, response.headers.get("Retry-After")
            except httpx.TimeoutException:
                status, retry_after = "timeout", None
            except httpx.TransportError as error:
                status, retry_after = type(error).__name__, None
            return {"status": status, "seconds": time.perf_counter() - began, "retry_after": retry_after}

        tasks = [asyncio.create_task(one(n)) for n in range(count)]
        await asyncio.sleep(0.5)  # every task is waiting on the event
        start.set()
        return await asyncio.gather(*tasks)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3)


def summarize(results: list[dict]) -> dict:
    served = [r["seconds"] for r in results if r["status"] == 201]
    shed = [r for r in results if r["status"] in (429, 503)]
    return {
        "requests": len(results),
        "status_counts": {str(k): n for k, n in sorted(Counter(r["status"] for r in results).items(), key=str)},
        "served": len(served),
        "shed": len(shed),
        "shed_without_retry_after": sum(r["retry_after"] is None for r in shed),
        "hanging": sum(r["status"] == "timeout" for r in results),
        "server_errors": sum(
            isinstance(r["status"], int) and r["status"] >= 500 and r["status"] != 503 for r in results
        ),
        "other": sum(r["status"] not in (201, 429, 503) for r in results),
        "served_p50_s": percentile(served, 50),
        "served_p95_s": percentile(served, 95),
        "served_max_s": round(max(served), 3) if served else None,
        "shed_p95_s": percentile([r["seconds"] for r in shed], 95),
        "wall_s": round(max((r["seconds"] for r in results), default=0), 3),
    }


def violations(figures: dict) -> list[str]:
    found = [f"{figures[name]} {name}" for name in ("shed_without_retry_after", "hanging", "other") if figures[name]]
    return found + ([] if figures["served"] else ["nothing was served"])


def main() -> None:
    from bench.report import save

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the server's")
    parser.add_argument("--base-model", default="embedded")
    parser.add_argument("--database", default="sqlite", choices=["sqlite", "postgres"], help="default: as shipped")
    parser.add_argument("--timeout", type=float, default=900, help="the client's timeout, seconds")
    parser.add_argument("--name", default="load", help="bench/results/<name>.json")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="draftloop-load-"))
    redis_url = os.environ.get("DRAFTLOOP_REDIS_URL", "redis://127.0.0.1:6379/0")  # drafts never need it
    try:
        url = fresh_database(args.database, folder)
        with Live(url, redis_url, folder, base_model=args.base_model) as live:
            live.start_api()
            keys = live.tenant()
            warm = httpx.post(
                f"{live.url}/v1/drafts",
                json={"sender": "a@b.c", "body": "Hi", "max_new_tokens": 1},
                headers=keys.agent,
                timeout=600,
            )  # the model loads on the first draft
            assert warm.status_code == 201, warm.text
            results = asyncio.run(send_all(live.url, keys.agent, args.requests, args.max_new_tokens, args.timeout))
            logged = live.logged_errors()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        drop_database(url)
    figures = summarize(results) | {
        "database": args.database,
        "base_model": args.base_model,
        "max_new_tokens": args.max_new_tokens or "server default",
        "client_timeout_s": args.timeout,
        "logged_errors": logged,
    }
    save(args.name, figures)
    if problems := violations(figures):
        sys.exit("load test failed: " + "; ".join(problems))


if __name__ == "__main__":
    main()
