"""Waiting for drafts on behalf of a client that may leave: a non-streaming request whose client
disconnects cancels its drafts at the engine's next step, instead of decoding for nobody."""

import asyncio

from fastapi import Request

from agent.stream import TokenStream
from core.errors import DomainError

POLL_S = 0.25  # how often the connection is looked at while the drafts decode


class ClientGone(DomainError):
    status_code = 499  # nginx's "client closed request": nobody reads this answer


async def finished(request: Request, streams: list[TokenStream]) -> None:
    """Return when every stream has ended; cancel them all and raise ClientGone if the client
    disconnects first. The streams must have been submitted from this event loop."""

    async def drain() -> None:
        for stream in streams:
            async for _ in stream:
                pass

    decoding = asyncio.ensure_future(drain())
    try:
        while not decoding.done():
            if await request.is_disconnected():
                raise ClientGone("the client disconnected; its drafts were cancelled")
            await asyncio.wait({decoding}, timeout=POLL_S)
        decoding.result()  # a stream's error, if any
    finally:
        if not decoding.done():
            for stream in streams:
                stream.cancel()
            await decoding  # the engine ends cancelled streams at its next step
