"""GET /metrics, scraped through the app after real requests and parsed as Prometheus parses it:
HTTP requests, the drafting engine, the adapter cache, the training runs and the gate's decisions;
and, with `draftloop serve --workers 2`, one scrape that counts every worker's requests."""

import glob
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.exc import OperationalError

from agent.drafting import Drafter
from api.deps import get_sessions
from core.settings import get_settings
from feedback.models import Role
from tests.api.apps import app_client
from tests.factories import EMAIL, make_key, make_tenant, random_lora, store_version
from tests.live import Live, fresh_database
from training.models import AdapterStatus, RunStatus
from training.runs import create_run

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(client, headers: dict | None = None) -> Samples:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def value(samples: Samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def increase(before: Samples, after: Samples, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_requests_are_counted_by_route_template_and_status(client, keys):
    before = scrape(client)
    created = client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 8}, headers=keys.agent)
    assert created.status_code == 201, created.text
    draft = created.json()
    assert client.get(f"/v1/drafts/{draft['id']}", headers=keys.agent).status_code == 200
    assert client.get("/v1/drafts/2000000000", headers=keys.agent).status_code == 404
    assert client.get("/no/such/page").status_code == 404
    with client.stream("POST", "/v1/drafts/stream", json=EMAIL | {"max_new_tokens": 4}, headers=keys.agent) as r:
        assert r.status_code == 200 and "event: draft" in r.read().decode()
    too_large = client.post("/v1/drafts", content=b"x" * (get_settings().max_request_bytes + 1), headers=keys.agent)
    assert too_large.status_code == 413
    after = scrape(client)

    requests = "draftloop_http_requests_total"
    assert increase(before, after, requests, method="POST", route="/v1/drafts", status="201") == 1
    assert increase(before, after, requests, method="GET", route="/v1/drafts/{draft_id}", status="200") == 1
    assert increase(before, after, requests, method="GET", route="/v1/drafts/{draft_id}", status="404") == 1
    assert increase(before, after, requests, method="GET", route="unmatched", status="404") == 1
    assert increase(before, after, requests, method="POST", route="/v1/drafts/stream", status="200") == 1
    # refused on its Content-Length before any route is chosen
    assert increase(before, after, requests, method="POST", route="unmatched", status="413") == 1
    assert increase(before, after, requests, method="GET", route="/metrics", status="200") == 1  # the first scrape
    routes = {dict(labels).get("route") for name, labels in after if name == requests}
    assert f"/v1/drafts/{draft['id']}" not in routes and "/no/such/page" not in routes

    duration = "draftloop_http_request_duration_seconds"
    assert increase(before, after, f"{duration}_count", method="POST", route="/v1/drafts") == 1
    assert increase(before, after, f"{duration}_bucket", method="POST", route="/v1/drafts", le="+Inf") == 1
    assert increase(before, after, f"{duration}_sum", method="POST", route="/v1/drafts") > 0


def test_the_engine_counts_tokens_steps_and_time_to_first_token(client, keys):
    before = scrape(client)
    draft = client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 8}, headers=keys.agent).json()
    after = scrape(client)

    tokens = increase(before, after, "draftloop_engine_generated_tokens_total")
    steps = increase(before, after, "draftloop_engine_step_duration_seconds_count")
    assert 8 >= tokens >= draft["tokens_generated"] > 0
    assert steps == tokens - 1  # the first token comes from the prompt's prefill, each other one from a step
    assert increase(before, after, "draftloop_engine_batch_size_sum") == steps  # one draft in every batch
    assert increase(before, after, "draftloop_engine_step_duration_seconds_sum") > 0
    assert increase(before, after, "draftloop_engine_time_to_first_token_seconds_count") == 1
    assert 0 < increase(before, after, "draftloop_engine_time_to_first_token_seconds_sum") * 1000 < draft["latency_ms"]
    assert value(after, "draftloop_engine_queue_depth") == 0


def _champion(session, settings, drafter_: Drafter, tenant, folder) -> None:
    adapter = store_version(session, settings, tenant.id, folder, base_fingerprint=drafter_.fingerprint)
    adapter.status = AdapterStatus.champion
    session.commit()


def test_the_adapter_cache_counts_loads_hits_and_evictions(session, tiny_model, model_settings, tmp_path):
    """Two tenants with a champion each, and room for one adapter: A loads, A hits, B loads and evicts A."""
    settings = get_settings().model_copy(update={"adapter_dir": tmp_path / "registry"})
    drafter_ = Drafter.local(tiny_model, model_settings.model_copy(update={"adapter_cache_count": 1}))  # an empty cache
    agents = {}
    for name, seed in (("a", 1), ("b", 2)):
        tenant = make_tenant(session)
        _champion(session, settings, drafter_, tenant, random_lora(tiny_model.model.config, tmp_path / name, seed=seed))
        agents[name] = {"X-API-Key": make_key(session, tenant, Role.agent)[1]}
    session.commit()
    try:
        with app_client(session, drafter_) as client:
            client.app.dependency_overrides[get_settings] = lambda: settings
            before = scrape(client)
            for name in ("a", "a", "b"):
                response = client.post("/v1/drafts", json=EMAIL | {"max_new_tokens": 2}, headers=agents[name])
                assert response.status_code == 201 and response.json()["adapter_id"] is not None, response.text
            after = scrape(client)
    finally:
        drafter_.close()
    assert increase(before, after, "draftloop_adapter_cache_loads_total") == 2
    assert increase(before, after, "draftloop_adapter_cache_hits_total") == 1
    assert increase(before, after, "draftloop_adapter_cache_evictions_total") == 1


def test_training_runs_and_the_gates_decisions_are_read_from_the_database(client, session):
    before = scrape(client)
    runs = {}
    for status in RunStatus:  # one tenant per run: a tenant has one active run at most
        tenant = make_tenant(session)
        run = create_run(session, tenant.id, trigger="test", requested_by="test")
        run.status, run.step, run.total_steps = status, 3, 10
        runs[status] = (tenant.slug, str(run.id))
    session.commit()
    after = scrape(client)

    assert value(after, "draftloop_training_metrics_up") == 1
    for status in RunStatus:
        assert increase(before, after, "draftloop_training_runs", status=status.value) == 1
    assert increase(before, after, "draftloop_gate_decisions_total", decision="promoted") == 1
    assert increase(before, after, "draftloop_gate_decisions_total", decision="rejected") == 1
    for status in (RunStatus.running, RunStatus.evaluating):  # the runs in progress, with their progress
        tenant, run = runs[status]
        assert value(after, "draftloop_training_run_step", tenant=tenant, run=run) == 3
        assert value(after, "draftloop_training_run_total_steps", tenant=tenant, run=run) == 10
    progress = {dict(labels)["run"] for name, labels in after if name == "draftloop_training_run_step"}
    assert runs[RunStatus.queued][1] not in progress and runs[RunStatus.promoted][1] not in progress


def test_a_scrape_without_the_database_still_shows_the_process(client):
    @contextmanager
    def unreachable(read_only: bool = False):
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("the database is down"))
        yield

    client.app.dependency_overrides[get_sessions] = lambda: unreachable
    samples = scrape(client)
    assert value(samples, "draftloop_training_metrics_up") == 0
    assert not any(name == "draftloop_training_runs" for name, _ in samples)
    assert ("draftloop_engine_generated_tokens_total", frozenset()) in samples


def test_a_metrics_token_guards_the_scrape(client):
    settings = get_settings().model_copy(update={"metrics_token": "scrape-me"})
    client.app.dependency_overrides[get_settings] = lambda: settings
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer another"}).status_code == 401
    assert value(scrape(client, {"Authorization": "Bearer scrape-me"}), "draftloop_training_metrics_up") == 1


def _healthz_by_worker(folder: str) -> dict[str, float]:
    """Each worker's own count of GET /healthz, read from its file of the multiprocess folder."""
    counts = {}
    for path in glob.glob(f"{folder}/counter_*.db"):
        families = MultiProcessCollector.merge([path], accumulate=False)
        pid = path.rsplit("_", 1)[1].removesuffix(".db")
        counts[pid] = sum(
            s.value
            for f in families
            for s in f.samples
            if s.name == "draftloop_http_requests_total" and s.labels.get("route") == "/healthz"
        )
    return counts


def test_one_scrape_counts_the_requests_of_every_worker(tiny_base_dir, tmp_path, monkeypatch):
    """`draftloop serve --workers 2`: requests spread over both workers, and every scrape, whichever
    worker answers it, counts all of them."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where serve makes its multiprocess folder
    with Live(
        fresh_database("sqlite", tmp_path), get_settings().redis_url, tmp_path, base_model=str(tiny_base_dir)
    ) as live:
        live.start_api(workers=2)
        (folder,) = glob.glob(f"{tmp_path}/draftloop-metrics-*")
        sent = 0
        with ThreadPoolExecutor(8) as pool:
            while sum(count > 0 for count in _healthz_by_worker(folder).values()) < 2 and sent < 400:
                statuses = list(pool.map(lambda _: httpx.get(f"{live.url}/healthz").status_code, range(16)))
                assert statuses == [200] * 16
                sent += 16
        by_worker = _healthz_by_worker(folder)
        assert sum(count > 0 for count in by_worker.values()) == 2 and sum(by_worker.values()) == sent
        for _ in range(6):
            response = httpx.get(f"{live.url}/metrics")
            samples = parse(response.text)
            assert value(samples, "draftloop_http_requests_total", method="GET", route="/healthz", status="200") == sent
            assert value(samples, "draftloop_training_metrics_up") == 1


def test_openmetrics_when_the_scraper_asks_for_it(client):
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    families = {family.name: family for family in openmetrics_families(response.text)}
    assert families["draftloop_gate_decisions"].type == "counter"
    assert families["draftloop_engine_time_to_first_token_seconds"].type == "histogram"
