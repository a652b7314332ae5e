"""Requests fired at once at a live server (a subprocess, SQLite and PostgreSQL): every 2xx is
stored as answered, a conflict is a 409 that says what conflicts, an overload a 503 with
Retry-After, and nothing is ever a 500."""

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy.orm import Session
from transformers import LlamaConfig

from tests.factories import random_lora, store_version
from training import registry
from training.models import AdapterEvent, AdapterStatus

N = 12


def at_once(n: int, request: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    """request(0..n-1) from n threads released together by a barrier."""
    barrier = threading.Barrier(n)

    def one(i: int) -> httpx.Response:
        barrier.wait()
        return request(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


class Attempts:
    """Every answer seen, retries of 503s included."""

    def __init__(self) -> None:
        self.answers: list[httpx.Response] = []
        self.lock = threading.Lock()

    def post(self, client: httpx.Client, url: str, **kwargs) -> httpx.Response:
        """POST, retried after a 503 as its Retry-After says (5 tries): the final answer."""
        for _ in range(5):
            response = client.post(url, **kwargs)
            with self.lock:
                self.answers.append(response)
            if response.status_code != 503:
                break
            assert "Retry-After" in response.headers, f"503 without Retry-After: {response.text}"
            time.sleep(min(float(response.headers["Retry-After"]), 1.0))
        return response

    def assert_no_server_error(self, live) -> None:
        errors = [
            f"{r.status_code} {r.request.url.path}"
            for r in self.answers
            if r.status_code >= 500 and r.status_code != 503
        ]
        assert not errors, f"server errors: {errors}; logged: {live.logged_errors()}"


def make_drafts(client: httpx.Client, keys, count: int) -> list[int]:
    emails = [{"sender": f"Customer {n} <c{n}@example.com>", "body": f"Where is order {n}?"} for n in range(count)]
    response = client.post("/v1/drafts/batch", json={"emails": emails, "max_new_tokens": 2}, headers=keys.agent)
    assert response.status_code == 201, response.text
    return [draft["id"] for draft in response.json()]


def edited(n: int) -> dict:
    return {"verdict": "edited", "final_text": f"Hi,\n\nOrder {n} ships on Monday.\n\nRide safe,\nMarta"}


def stored(client: httpx.Client, keys, draft_id: int) -> dict | None:
    response = client.get(f"/v1/drafts/{draft_id}", headers=keys.reviewer)
    assert response.status_code == 200, response.text
    return response.json()["correction"]


def statuses(responses: list[httpx.Response]) -> list[int]:
    return sorted(r.status_code for r in responses)


def test_parallel_corrections_to_many_drafts_are_all_stored(live, client, keys):
    ids, attempts = make_drafts(client, keys, N), Attempts()
    responses = at_once(
        N, lambda i: attempts.post(client, f"/v1/drafts/{ids[i]}/correction", json=edited(i), headers=keys.reviewer)
    )
    attempts.assert_no_server_error(live)
    assert statuses(responses) == [201] * N, [r.text for r in responses]
    for draft_id, response in zip(ids, responses, strict=True):
        assert stored(client, keys, draft_id) == response.json()


@pytest.mark.parametrize("idempotency", [{}, {"Idempotency-Key": "one-key"}], ids=["no-key", "one-key"])
def test_parallel_identical_corrections_to_one_draft_store_one(live, client, keys, idempotency):
    [draft_id], attempts = make_drafts(client, keys, 1), Attempts()
    url, headers = f"/v1/drafts/{draft_id}/correction", keys.reviewer | idempotency
    responses = at_once(N, lambda i: attempts.post(client, url, json=edited(0), headers=headers))
    attempts.assert_no_server_error(live)
    assert statuses(responses) == [200] * (N - 1) + [201], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert stored(client, keys, draft_id) == responses[0].json()


@pytest.mark.parametrize("idempotency", [{}, {"Idempotency-Key": "one-key"}], ids=["no-key", "one-key"])
def test_parallel_different_corrections_to_one_draft_store_one_and_the_rest_conflict(live, client, keys, idempotency):
    [draft_id], attempts = make_drafts(client, keys, 1), Attempts()
    url, headers = f"/v1/drafts/{draft_id}/correction", keys.reviewer | idempotency
    responses = at_once(N, lambda i: attempts.post(client, url, json=edited(i), headers=headers))
    attempts.assert_no_server_error(live)
    assert statuses(responses) == [201] + [409] * (N - 1), [r.text for r in responses]
    [winner] = [r for r in responses if r.status_code == 201]
    for loser in (r for r in responses if r.status_code == 409):  # the draft's or the key's correction
        assert "different correction" in loser.json()["detail"], loser.text
    assert stored(client, keys, draft_id) == winner.json()


def test_one_idempotency_key_sent_at_once_for_different_drafts_stores_one(live, client, keys):
    ids, attempts = make_drafts(client, keys, N), Attempts()
    headers = keys.reviewer | {"Idempotency-Key": "same-key-other-drafts"}
    responses = at_once(
        N, lambda i: attempts.post(client, f"/v1/drafts/{ids[i]}/correction", json=edited(i), headers=headers)
    )
    attempts.assert_no_server_error(live)
    assert statuses(responses) == [201] + [409] * (N - 1), [r.text for r in responses]
    for loser in (r for r in responses if r.status_code == 409):
        assert "this Idempotency-Key was already used for a different correction" in loser.json()["detail"]
    corrections = {draft_id: stored(client, keys, draft_id) for draft_id in ids}
    [winner] = [r for r in responses if r.status_code == 201]
    assert corrections[winner.json()["draft_id"]] == winner.json()
    assert [draft_id for draft_id, c in corrections.items() if c is not None] == [winner.json()["draft_id"]]


@pytest.fixture
def versions(live, keys, tiny_base_dir, tmp_path) -> list[int]:
    """N candidate adapter versions of the tenant in the live server's registry."""
    from core.settings import Settings

    # The live server's registry (<var_dir>/adapters) and base model: promotion checks the fingerprint
    settings = Settings(var_dir=live.var_dir, base_model=str(tiny_base_dir))
    trained = random_lora(LlamaConfig.from_pretrained(tiny_base_dir), tmp_path / "trained")
    with Session(live.engine) as session:
        candidates = [store_version(session, settings, keys.tenant_id, trained).version for _ in range(N)]
        session.commit()
    return candidates


def champions_and_promotions(live, tenant_id: int) -> tuple[list[int], int]:
    with Session(live.engine) as session:
        adapters = registry.list_adapters(session, tenant_id)
        champions = [a.version for a in adapters if a.status == AdapterStatus.champion]
        events = session.query(AdapterEvent).filter_by(tenant_id=tenant_id, action="promote").count()
    return champions, events


def promote(attempts: Attempts, client, keys, version: int) -> httpx.Response:
    return attempts.post(client, f"/v1/adapters/{version}/promote", json={"reason": "at once"}, headers=keys.admin)


def test_parallel_promotions_of_different_versions_leave_one_champion(live, client, keys, versions):
    attempts = Attempts()
    responses = at_once(N, lambda i: promote(attempts, client, keys, versions[i]))
    attempts.assert_no_server_error(live)
    assert set(statuses(responses)) <= {200, 409}, [r.text for r in responses]
    promoted = [r.json()["version"] for r in responses if r.status_code == 200]
    for loser in (r for r in responses if r.status_code == 409):
        assert loser.json()["detail"], loser.text
    champions, events = champions_and_promotions(live, keys.tenant_id)
    assert len(champions) == 1 and champions[0] in promoted
    assert events == len(promoted)  # every promotion answered 200 is in the audit log, no other


def test_parallel_promotions_of_one_version_promote_it_once(live, client, keys, versions):
    attempts = Attempts()
    responses = at_once(N, lambda i: promote(attempts, client, keys, versions[0]))
    attempts.assert_no_server_error(live)
    assert statuses(responses) == [200] + [409] * (N - 1), [r.text for r in responses]
    for loser in (r for r in responses if r.status_code == 409):
        assert "already the champion" in loser.json()["detail"], loser.text
    assert champions_and_promotions(live, keys.tenant_id) == ([versions[0]], 1)
