"""The reviewer's pages: server-rendered HTML, mounted on the API app at /web. They call the
same service functions as the JSON routes; errors render as pages, not JSON."""

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from api.web import auth, dashboard, review
from api.web.templating import flash, render
from core.db import as_domain_error
from core.errors import DomainError, Unauthorized
from core.settings import Settings

PREFIX = "/web"


class SessionCookie:
    """Starlette's signed session cookie, marked Secure on requests that came over HTTPS
    (scope scheme https: TLS at uvicorn, or X-Forwarded-Proto from a proxy uvicorn trusts),
    and on every request when always_secure; plain HTTP (http://127.0.0.1) keeps working."""

    def __init__(self, app: ASGIApp, *, always_secure: bool, **options) -> None:
        self.secure = SessionMiddleware(app, https_only=True, **options)
        self.plain = self.secure if always_secure else SessionMiddleware(app, https_only=False, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cookie = self.secure if scope.get("scheme") == "https" else self.plain
        await cookie(scope, receive, send)


def _error_page(request: Request, status_code: int, message: str):
    return render(request, "error.html", status_code=status_code, status=status_code, message=message)


def create_web_app(settings: Settings) -> FastAPI:
    web = FastAPI(title="draftloop pages", docs_url=None, redoc_url=None, openapi_url=None)
    web.add_middleware(
        SessionCookie,
        always_secure=settings.secure_cookies,
        secret_key=auth.secret_key(settings),
        session_cookie="draftloop_session",
        max_age=int(auth.SESSION_LIFETIME.total_seconds()),
        path=PREFIX,
        same_site="lax",
    )

    @web.exception_handler(DomainError)
    def domain_error(request: Request, error: DomainError):
        if isinstance(error, Unauthorized):
            flash(request, error.message, "error")
            return RedirectResponse(request.url_for("web:signin_form"), status_code=303)
        return _error_page(request, error.status_code, error.message)

    @web.exception_handler(DBAPIError)
    def database_error(request: Request, error: DBAPIError):
        if (domain := as_domain_error(error)) is None:
            raise error
        return domain_error(request, domain)

    @web.exception_handler(RequestValidationError)
    def invalid_form(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in error.errors())
        return _error_page(request, 422, f"the form was not filled in as expected ({problems})")

    @web.exception_handler(HTTPException)
    def http_error(request: Request, error: HTTPException):
        return _error_page(request, error.status_code, str(error.detail))

    web.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    for module in (auth, review, dashboard):
        web.include_router(module.router)
    return web
