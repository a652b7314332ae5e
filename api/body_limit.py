"""One limit on the size of every request body, enforced on the bytes as they arrive.

A Content-Length over the limit is refused before anything is read; a body sent without one
(chunked) is counted as it streams in and refused at the first byte past the limit, so no route,
and no authentication that reads the body first, ever sees more than the limit."""

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from inside the app while it reads the body; FastAPI passes HTTPExceptions on to
    the error handlers instead of turning them into a 400 about parsing."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {max_bytes} bytes")


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            detail = f"the request has a Content-Length of {length.decode('latin-1')!r}; the limit is {self.max_bytes}"
            return await JSONResponse({"detail": detail}, 413)(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)
