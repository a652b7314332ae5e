"""Signing in to the pages: a reviewer or admin key, checked once, then a browser session stored
in the database (feedback.service), whose random id the signed session cookie carries (never
the key, nor its id). Every request checks that the session is live and its key not revoked,
so signing out or revoking the key ends it for every copy of the cookie; every form POST must
carry the session's CSRF token."""

import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse

from api.deps import SessionDep
from api.web.templating import csrf_token, flash, render
from core.errors import Forbidden, Unauthorized
from core.settings import Settings
from feedback.models import ApiKey, Role
from feedback.service import authenticate, end_web_session, start_web_session, web_session_key

PAGE_ROLES = (Role.reviewer, Role.admin)
SESSION_LIFETIME = timedelta(hours=12)  # from sign-in; the cookie's max age is the same


def secret_key(settings: Settings) -> str:
    """DRAFTLOOP_SECRET_KEY, or a random key created once in <var_dir>/secret_key (mode 0600),
    so every process on this machine signs cookies alike and sessions survive a restart."""
    if settings.secret_key:
        return settings.secret_key
    path = settings.var_dir / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".secret_key-{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_urlsafe(48))
        try:
            os.link(scratch, path)  # atomic: the first process to get here wins, the others read its key
        except FileExistsError:
            pass
        finally:
            Path(scratch).unlink()
    return path.read_text().strip()


def check_csrf(request: Request, csrf_token: Annotated[str, Form()] = "") -> None:
    expected = request.session.get("csrf")
    if not expected or not secrets.compare_digest(csrf_token.encode(), expected.encode()):
        raise Forbidden("this form's security token is missing or out of date; reload the page and send it again")


CSRF = Depends(check_csrf)


def signed_in(request: Request, session: SessionDep) -> ApiKey:
    session_id = request.session.get("session_id")
    if session_id is None:
        raise Unauthorized("sign in with your reviewer or admin key")
    try:
        return web_session_key(session, session_id)
    except Unauthorized:
        request.session.clear()
        raise


def admin(key: Annotated[ApiKey, Depends(signed_in)]) -> ApiKey:
    if key.role != Role.admin:
        raise Forbidden(f"the dashboard needs an admin key; you signed in with a {key.role} key")
    return key


PageKey = Annotated[ApiKey, Depends(signed_in)]
AdminPageKey = Annotated[ApiKey, Depends(admin)]

router = APIRouter()


@router.get("/signin", name="signin_form")
def signin_form(request: Request):
    return render(request, "signin.html")


@router.post("/signin", name="signin", dependencies=[CSRF])
def signin(request: Request, session: SessionDep, api_key: Annotated[str, Form()] = ""):
    key = authenticate(session, api_key.strip())
    if key.role not in PAGE_ROLES:
        raise Unauthorized(f"a {key.role} key cannot sign in here; use a reviewer or admin key")
    request.session.clear()  # a new session: a fresh CSRF token, nothing left from before
    request.session["session_id"] = start_web_session(session, key, lifetime=SESSION_LIFETIME)
    csrf_token(request)
    return RedirectResponse(request.url_for("web:queue"), status_code=303)


@router.post("/signout", name="signout", dependencies=[CSRF])
def signout(request: Request, session: SessionDep):
    if "session_id" in request.session:
        end_web_session(session, request.session["session_id"])
    request.session.clear()
    flash(request, "You are signed out.")
    return RedirectResponse(request.url_for("web:signin_form"), status_code=303)
