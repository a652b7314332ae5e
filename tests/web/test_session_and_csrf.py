"""The pages' session and form protection, over HTTP: the cookie and the session it names, the
CSRF token on every form POST, what the buttons mean, errors rendered as pages, and a
pathological correction's page."""

import base64
import hashlib
import json
import re
import stat
import time
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from api.app import create_app
from api.web import auth
from api.web.review import correction_from_form
from core.db import committing
from core.errors import Invalid
from core.settings import Settings, get_settings
from feedback.models import ApiKey, Correction, Draft, Tenant, Verdict, WebSession, utcnow
from feedback.service import CorrectionInput
from tests.factories import make_correction, make_draft
from training import registry
from training.models import TrainingRun


@pytest.fixture
def client(web_settings, postgres_engine) -> Iterator[TestClient]:
    with TestClient(create_app(), follow_redirects=False) as test_client:
        yield test_client


def form_token(client: TestClient, path: str = "/web/signin") -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text).group(1)


def sign_in(client: TestClient, key: str) -> str:
    """Sign in; the session's new CSRF token."""
    response = client.post("/web/signin", data={"csrf_token": form_token(client), "api_key": key})
    assert response.status_code == 303 and response.headers["location"].endswith("/web/queue")
    return form_token(client, "/web/queue")


def cookie_payload(set_cookie: str) -> dict:
    value = set_cookie.split(";")[0].split("=", 1)[1]
    return json.loads(base64.b64decode(value.split(".")[0]))


def test_the_session_cookie_is_signed_http_only_lax_and_names_a_stored_session(client, shop, committed):
    response = client.post("/web/signin", data={"csrf_token": form_token(client), "api_key": shop.reviewer})
    cookie = response.headers["set-cookie"]
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/web" in cookie
    assert "secure" not in cookie  # plain HTTP: a browser at http://127.0.0.1 keeps the cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    payload = cookie_payload(cookie)
    assert set(payload) == {"session_id", "csrf"} and shop.reviewer not in cookie
    with committed() as session:
        stored = session.scalar(select(WebSession).where(WebSession.key_id == shop.reviewer_key_id))
        assert stored.token_hash == hashlib.sha256(payload["session_id"].encode()).hexdigest()
        assert stored.expires_at - stored.created_at == timedelta(hours=12) and stored.ended_at is None

    assert client.get("/web/queue").status_code == 200
    client.cookies.clear()
    client.cookies.set("draftloop_session", value[:-2] + "xx")  # a forged signature
    response = client.get("/web/queue")
    assert response.status_code == 303 and response.headers["location"].endswith("/web/signin")


def test_a_cookie_copied_before_sign_out_is_refused_after_it(client, shop, committed):
    token = sign_in(client, shop.reviewer)
    copied = client.cookies["draftloop_session"]
    signed_out = client.post("/web/signout", data={"csrf_token": token})
    assert signed_out.status_code == 303 and signed_out.headers["location"].endswith("/web/signin")
    with committed() as session:
        assert session.scalar(select(WebSession.ended_at).where(WebSession.key_id == shop.reviewer_key_id))

    client.cookies.clear()
    client.cookies.set("draftloop_session", copied)
    response = client.get("/web/queue")
    assert response.status_code == 303 and response.headers["location"].endswith("/web/signin")
    client.cookies.set("draftloop_session", copied)
    response = client.post(f"/web/drafts/{shop.draft_ids[0]}", data={"csrf_token": token, "action": "accept"})
    assert response.status_code == 303 and response.headers["location"].endswith("/web/signin")
    with committed() as session:
        assert session.scalar(select(Correction).where(Correction.draft_id == shop.draft_ids[0])) is None


def test_sessions_expire_and_expired_ones_are_deleted_at_the_next_sign_in(client, shop, committed):
    sign_in(client, shop.reviewer)
    with committed() as session, committing(session):
        session.execute(update(WebSession).where(WebSession.key_id == shop.reviewer_key_id).values(expires_at=utcnow()))
    response = client.get("/web/queue")
    assert response.status_code == 303 and response.headers["location"].endswith("/web/signin")
    assert "has ended or expired" in client.get("/web/signin").text

    sign_in(client, shop.admin)
    with committed() as session:
        assert session.scalars(select(WebSession).where(WebSession.key_id == shop.reviewer_key_id)).all() == []


def test_the_cookie_is_secure_over_https_and_not_over_plain_http(web_settings, shop):
    with TestClient(create_app(), base_url="https://testserver", follow_redirects=False) as https:
        response = https.post("/web/signin", data={"csrf_token": form_token(https), "api_key": shop.reviewer})
        assert response.status_code == 303 and "secure" in response.headers["set-cookie"]
        assert https.get("/web/queue").status_code == 200


def test_behind_a_local_proxy_x_forwarded_proto_makes_the_cookie_secure(server):
    """uvicorn, as `draftloop serve` and the test server start it, trusts X-Forwarded-Proto from
    127.0.0.1, so a TLS proxy on the same machine gets Secure cookies with no setting."""
    proxied = httpx.get(f"{server}/web/signin", headers={"X-Forwarded-Proto": "https"})
    assert proxied.status_code == 200 and "secure" in proxied.headers["set-cookie"]
    direct = httpx.get(f"{server}/web/signin")
    assert direct.status_code == 200 and "secure" not in direct.headers["set-cookie"]


def test_secure_cookies_setting_makes_the_cookie_secure_over_plain_http_too(web_settings, monkeypatch):
    """For a proxy whose X-Forwarded-Proto uvicorn does not trust: over plain HTTP the browser
    then keeps no cookie, so this is for HTTPS only."""
    monkeypatch.setenv("DRAFTLOOP_SECURE_COOKIES", "true")
    get_settings.cache_clear()
    try:
        with TestClient(create_app(), follow_redirects=False) as plain:
            response = plain.get("/web/signin")
    finally:
        get_settings.cache_clear()
    assert response.status_code == 200 and "secure" in response.headers["set-cookie"]


def test_a_pathological_correction_shows_its_diff_quickly_with_the_stored_count(client, shop, committed):
    with committed() as session, committing(session):
        tenant, reviewer = session.get(Tenant, shop.tenant_id), session.get(ApiKey, shop.reviewer_key_id)
        draft = make_draft(session, tenant, "a " * 1000)
        make_correction(session, draft, reviewer, Verdict.edited, "a b " * 500)  # unbounded: ~10 s to diff
    sign_in(client, shop.reviewer)
    started = time.perf_counter()
    page = client.get(f"/web/drafts/{draft.id}")
    assert time.perf_counter() - started < 2
    assert page.status_code == 200 and "999 words changed" in page.text and "<ins>" in page.text


def test_every_form_post_needs_the_session_csrf_token(client, versions, committed):
    shop = versions.shop
    with TestClient(create_app(), follow_redirects=False) as fresh:
        form_token(fresh)
        refused = fresh.post("/web/signin", data={"api_key": shop.admin})
        assert refused.status_code == 403 and "set-cookie" not in refused.headers

    sign_in(client, shop.admin)
    forms = {
        f"/web/drafts/{shop.draft_ids[0]}": {"action": "accept"},
        "/web/dashboard/promote": {"version": "1", "reason": "forged"},
        "/web/dashboard/rollback": {"reason": "forged"},
        "/web/dashboard/runs": {},
        "/web/dashboard/scale": {"scale": "0.5"},
        "/web/signout": {},
    }
    for path, data in forms.items():
        for token in ({}, {"csrf_token": "forged"}, {"csrf_token": ""}):
            response = client.post(path, data=data | token)
            assert response.status_code == 403, path
            assert "security token is missing or out of date" in response.text

    with committed() as session:
        assert session.scalar(select(Correction).where(Correction.draft_id == shop.draft_ids[0])) is None
        assert registry.champion(session, shop.tenant_id).version == 2
        runs = session.scalar(select(func.count()).where(TrainingRun.tenant_id == shop.tenant_id))
        assert runs == 3
        assert session.get(Tenant, shop.tenant_id).adapter_scale is None
    assert client.get("/web/queue").status_code == 200  # still signed in: sign-out was refused too


def test_errors_render_as_pages_and_the_json_api_stays_json(client, shop, shops):
    other = shops[1]
    token = sign_in(client, shop.admin)
    response = client.get(f"/web/drafts/{other.draft_ids[0]}")
    assert response.status_code == 404 and "text/html" in response.headers["content-type"]
    assert f"No draft {other.draft_ids[0]}." in response.text

    response = client.post("/web/dashboard/promote", data={"csrf_token": token, "version": "two", "reason": "r"})
    assert response.status_code == 422 and "version" in response.text and "<h1>" in response.text
    response = client.post("/web/dashboard/promote", data={"csrf_token": token, "version": "7", "reason": "r"})
    assert response.status_code == 404 and "No adapter version 7 for this tenant." in response.text
    response = client.post("/web/dashboard/rollback", data={"csrf_token": token, "reason": "  "})
    assert response.status_code == 422 and "Give a reason" in response.text
    response = client.post(f"/web/drafts/{shop.draft_ids[0]}", data={"csrf_token": token, "action": "zap"})
    assert response.status_code == 422 and "Unknown action &#39;zap&#39;" in response.text

    api = client.get(f"/v1/drafts/{other.draft_ids[0]}", headers={"X-API-Key": shop.admin})
    assert api.status_code == 404 and api.json() == {"detail": f"no draft {other.draft_ids[0]}"}
    assert client.get("/", follow_redirects=True).url.path == "/web/queue"


def test_what_the_buttons_mean():
    draft = Draft(draft_text="Hi Sam,\nthe order ships Monday.")
    cases = [
        ("accept", "anything", CorrectionInput(Verdict.accepted, None, "")),
        ("edit", "Hi Sam,\r\nthe order ships Monday.\r\n", CorrectionInput(Verdict.accepted, None, "")),
        ("edit", "Hi Sam,\r\nit ships today.", CorrectionInput(Verdict.edited, "Hi Sam,\nit ships today.", "")),
        ("reject", "Hi Sam,\nthe order ships Monday.", CorrectionInput(Verdict.rejected, None, "")),
        ("reject", "Sorry, we do not ship.", CorrectionInput(Verdict.rejected, "Sorry, we do not ship.", "")),
    ]
    for action, text, expected in cases:
        assert correction_from_form(draft, action, text, "") == expected, action
    with pytest.raises(Invalid):
        correction_from_form(draft, "zap", "", "")


def test_the_signing_key_is_made_once_and_kept_private(tmp_path):
    settings = Settings(var_dir=tmp_path / "var", secret_key="")
    key = auth.secret_key(settings)
    assert len(key) >= 48 and auth.secret_key(settings) == key
    assert stat.S_IMODE((tmp_path / "var" / "secret_key").stat().st_mode) == 0o600
    assert [p.name for p in (tmp_path / "var").iterdir()] == ["secret_key"]
    assert auth.secret_key(Settings(var_dir=tmp_path / "var", secret_key="from-the-environment")) == (
        "from-the-environment"
    )


def test_page_ids_and_form_fields_are_checked_at_the_edge(client, versions, committed):
    shop = versions.shop
    token = sign_in(client, shop.admin)
    for bad in (0, 2**31, 2**63):
        response = client.get(f"/web/drafts/{bad}")
        assert response.status_code == 422 and "text/html" in response.headers["content-type"], bad
        response = client.post(f"/web/drafts/{bad}", data={"csrf_token": token, "action": "accept"})
        assert response.status_code == 422, bad
        response = client.post("/web/dashboard/promote", data={"csrf_token": token, "version": str(bad), "reason": "r"})
        assert response.status_code == 422 and "version" in response.text, bad
    draft_page = f"/web/drafts/{shop.draft_ids[0]}"
    for data in (
        {"action": "edit", "final_text": "Hi\x00there"},
        {"action": "reject", "reason": "bad\x00"},
        {"action": "accept\x00"},
    ):
        response = client.post(draft_page, data=data | {"csrf_token": token})
        assert response.status_code == 422 and "NUL" in response.text, data
    response = client.post("/web/dashboard/rollback", data={"csrf_token": token, "reason": "r\x00"})
    assert response.status_code == 422 and "NUL" in response.text
    response = client.post("/web/signin", data={"csrf_token": token, "api_key": "dl_\x00"})
    assert response.status_code == 422 and "NUL" in response.text
    with committed() as session:
        assert session.scalar(select(Correction).where(Correction.draft_id == shop.draft_ids[0])) is None
        assert registry.champion(session, shop.tenant_id).version == 2


def test_the_dashboard_sets_and_clears_the_tenants_adapter_scale(client, versions, committed):
    shop = versions.shop
    token = sign_in(client, shop.admin)

    def stored() -> float | None:
        with committed() as session:
            return session.get(Tenant, shop.tenant_id).adapter_scale

    page = client.get("/web/dashboard").text
    assert "Served at scale 1, chosen on its validation slice." in page and 'name="scale" type="number"' in page
    response = client.post("/web/dashboard/scale", data={"csrf_token": token, "scale": "0.75"})
    assert response.status_code == 303 and stored() == 0.75
    page = client.get("/web/dashboard").text
    assert "Adapters are served at scale 0.75 now." in page and "served at scale 0.75, set for this tenant" in page
    for bad in ("3", "0", "0.123", "many", "nan"):
        response = client.post("/web/dashboard/scale", data={"csrf_token": token, "scale": bad})
        assert response.status_code == 422 and "adapter scale must be" in response.text, bad
    assert stored() == 0.75
    response = client.post("/web/dashboard/scale", data={"csrf_token": token, "scale": ""})
    assert response.status_code == 303 and stored() is None
    assert "Each version is served at its own chosen scale now." in client.get("/web/dashboard").text
