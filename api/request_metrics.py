"""Counts every HTTP request by method, route template and status, and times it, as a plain ASGI
middleware: it only watches the messages go by, so streamed responses, the body limit and the
disconnect handling are untouched.

The route is the template (`/v1/drafts/{draft_id}`, `/web/drafts/{draft_id}`), never the raw
path, so the number of series stays bounded: the route the router chose, read from the request's
scope once the app has answered. A path no route matched counts as `unmatched` (within the pages,
`/web/{path}`; their static files `/web/static/{path}`), as does a request refused before routing
(a Content-Length over the body limit); an unusual method counts as `other`."""

import time

from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import metrics

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(scope: Scope, routes: list[BaseRoute]) -> str:
    """The template of the route that answered the request (`scope` after the app has run)."""
    root_path = scope.get("root_path", "")
    mounted = root_path[len(scope.get("app_root_path", root_path)) :]  # the prefix of a mounted app, if any
    route = scope.get("route")  # FastAPI's routes leave it; the app's plain routes (the docs) do not
    if route is None and not mounted:
        route = next((r for r in routes if isinstance(r, Route) and r.matches(scope)[0] is Match.FULL), None)
    if route is not None and not isinstance(route, Mount) and getattr(route, "path_format", None):
        return mounted + route.path_format
    return f"{mounted}/{{path}}" if mounted else UNMATCHED


class RequestMetrics:
    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method = scope["method"] if scope["method"] in METHODS else "other"
        status = 500  # an exception before the response started: the server answers 500

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, watched)
        finally:
            route = route_template(scope, self.routes)
            metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
            metrics.HTTP_DURATION.labels(method, route).observe(time.perf_counter() - started)
