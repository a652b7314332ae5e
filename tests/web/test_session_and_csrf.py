"""The pages' session and form protection, over HTTP: the cookie, the CSRF token on every form
POST, what the buttons mean, and errors rendered as pages."""

import base64
import json
import re
import stat
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from api.web import auth
from api.web.review import correction_from_form
from core.errors import Invalid
from core.settings import Settings, get_settings
from feedback.models import Correction, Draft, Verdict
from feedback.service import CorrectionInput
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


def test_the_session_cookie_is_signed_http_only_lax_and_holds_no_key(client, shop):
    response = client.post("/web/signin", data={"csrf_token": form_token(client), "api_key": shop.reviewer})
    cookie = response.headers["set-cookie"]
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/web" in cookie
    assert "secure" not in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    payload = json.loads(base64.b64decode(value.split(".")[0]))
    assert set(payload) == {"key_id", "csrf"} and shop.reviewer not in cookie

    assert client.get("/web/queue").status_code == 200
    client.cookies.clear()
    client.cookies.set("draftloop_session", value[:-2] + "xx")  # a forged signature
    response = client.get("/web/queue")
    assert response.status_code == 303 and response.headers["location"].endswith("/web/signin")


def test_secure_cookies_are_sent_only_over_https(web_settings, shop, monkeypatch):
    monkeypatch.setenv("DRAFTLOOP_SECURE_COOKIES", "true")
    get_settings.cache_clear()
    try:
        with TestClient(create_app(), base_url="https://testserver", follow_redirects=False) as https:
            response = https.post("/web/signin", data={"csrf_token": form_token(https), "api_key": shop.reviewer})
    finally:
        get_settings.cache_clear()
    assert response.status_code == 303
    assert "secure" in response.headers["set-cookie"]


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
