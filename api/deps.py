"""Dependencies shared by the routes: the request's session, the caller's key, the drafter."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from agent.drafting import Drafter, get_drafter
from core.db import Sessions, read_only, session_scope
from core.errors import Forbidden, Unauthorized
from core.settings import Settings, get_settings
from feedback.models import ApiKey, Role
from feedback.service import authenticate


def get_sessions() -> Sessions:
    """Where sessions come from: requests, and work that outlives one (a streamed draft)."""
    return session_scope


SessionsDep = Annotated[Sessions, Depends(get_sessions)]


SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def get_db(sessions: SessionsDep, request: Request) -> Iterator[Session]:
    """One session per request, committed once at the end of a successful request. A request
    that only reads (GET) takes no write lock on SQLite; every other one takes it up front."""
    with sessions() as session:
        if request.method in SAFE_METHODS:
            read_only(session)
        yield session


# scope="function": the commit happens before the response is sent, so a failed commit is an error
SessionDep = Annotated[Session, Depends(get_db, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def drafter() -> Drafter:
    return get_drafter()


DrafterDep = Annotated[Drafter, Depends(drafter)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="Your draftloop API key")
_bearer = HTTPBearer(auto_error=False, description="The same API key as a bearer token")


def _caller(
    session: SessionDep,
    api_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> ApiKey:
    raw_key = api_key or (bearer.credentials if bearer else None)
    if not raw_key:
        raise Unauthorized("send your API key in the X-API-Key header (or as a bearer token)")
    return authenticate(session, raw_key)


def require(*roles: Role):
    """A key of one of these roles, within its rate limit; admin keys may do everything within
    their tenant."""

    def check(request: Request, key: Annotated[ApiKey, Depends(_caller)]) -> ApiKey:
        request.app.state.rate_limit.hit(key.id)
        if key.role != Role.admin and key.role not in roles:
            allowed = ", ".join(sorted({*roles, Role.admin}))
            raise Forbidden(f"this route needs a key with role {allowed}; yours is {key.role}")
        return key

    return Depends(check)


AnyKey = Annotated[ApiKey, require(Role.agent, Role.reviewer)]
AgentKey = Annotated[ApiKey, require(Role.agent)]
ReviewerKey = Annotated[ApiKey, require(Role.reviewer)]
AdminKey = Annotated[ApiKey, require()]
