"""Templates and the per-session helpers they use: the CSRF token and flash messages."""

import secrets
from datetime import datetime
from pathlib import Path

from fastapi import Request
from fastapi.templating import Jinja2Templates
from starlette.responses import HTMLResponse

from feedback.diff import word_diff

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use; every form carries it in a hidden field."""
    if "csrf" not in request.session:
        request.session["csrf"] = secrets.token_urlsafe(32)
    return request.session["csrf"]


def flash(request: Request, message: str, kind: str = "info") -> None:
    # assigned, not appended in place: the session is written back only when an item is set
    request.session["flash"] = [*request.session.get("flash", []), {"message": message, "kind": kind}]


def pop_flashes(request: Request) -> list[dict]:
    return request.session.pop("flash", [])


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else ""


def sentence(text: str) -> str:
    """Service messages are lower-case clauses; on a page they read as sentences."""
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


templates.env.globals.update(csrf_token=csrf_token, pop_flashes=pop_flashes, word_diff=word_diff)
templates.env.filters.update(when=when, sentence=sentence)


def render(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)
