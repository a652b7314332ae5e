"""The FastAPI application: routers, the error handlers, the request size limit, the request metrics."""

import math

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError

from api.body_limit import BodyLimit
from api.rate_limit import KeyRateLimit
from api.request_metrics import RequestMetrics
from api.routes import admin, completions, drafts, health, metrics, review, serving, training
from api.web import PREFIX, create_web_app
from core.db import as_domain_error
from core.errors import Conflict, DomainError, RetryLater
from core.settings import get_settings


class ErrorOut(BaseModel):
    detail: str


ERRORS = {
    status: {"model": ErrorOut, "description": description}
    for status, description in {
        401: "Missing, unknown or revoked API key",
        403: "The key's role may not use this route",
        404: "No such object in the key's tenant",
        409: "Conflicts with what is stored (for a correction, `stored` is the one kept)",
        413: "The email or the request is too large; the message gives the limit",
        429: "Over the key's rate limit or the tenant's share of the drafting queue: retry after Retry-After",
        503: "Too many drafts in progress, or the database busy: retry after the Retry-After header's seconds",
    }.items()
}


def _renderable(value):
    """Echoed input as JSON can carry it: lone surrogates escaped, NaN and infinities as text."""
    if isinstance(value, str):
        return value.encode(errors="backslashreplace").decode()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {_renderable(k): _renderable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_renderable(v) for v in value]
    return value


def create_app() -> FastAPI:
    app = FastAPI(
        title="draftloop",
        version="0.1.0",
        description="Draft email replies with per-tenant adapters and learn from reviewers' corrections. "
        "Authenticate with an API key in the `X-API-Key` header.",
    )

    @app.exception_handler(DomainError)
    def domain_error(request: Request, error: DomainError) -> JSONResponse:
        headers = {"Retry-After": str(error.retry_after_s)} if isinstance(error, RetryLater) else None
        body = {"detail": error.message}
        if isinstance(error, Conflict) and isinstance(error.stored, dict):  # what a route shows of it
            body["stored"] = error.stored
        if request.url.path in completions.PATHS + serving.PATHS:  # the error shape OpenAI clients read
            body = {"error": {"message": error.message, "type": type(error).__name__, "code": error.status_code}}
        return JSONResponse(body, status_code=error.status_code, headers=headers)

    @app.exception_handler(SQLAlchemyError)
    def database_error(request: Request, error: SQLAlchemyError) -> JSONResponse:
        if (domain := as_domain_error(error)) is None:
            raise error
        return domain_error(request, domain)

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 body, with what it echoes made renderable."""
        return JSONResponse({"detail": _renderable(jsonable_encoder(error.errors()))}, status_code=422)

    settings = get_settings()
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestMetrics, routes=app.routes)  # outermost: it sees the body limit's 413s too
    app.state.rate_limit = KeyRateLimit(settings.redis_url, settings.rate_limit_per_key)

    app.include_router(health.router)
    app.include_router(metrics.router)
    for module in (drafts, completions, serving, review, training, admin):
        app.include_router(module.router, responses=ERRORS)

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/", status_code=303)

    app.mount(PREFIX, create_web_app(settings), name="web")  # the reviewer's pages; route names "web:..."
    return app
