"""The token-stream contract both drafting backends share: a request's tokens arrive on a
`TokenStream` as they are decoded, and `emit` ends every draft by one rule (the in-process
engine, agent/engine.py, and the remote backend, agent/remote.py)."""

import asyncio
import queue
import threading
import time
from collections.abc import Callable

from agent.repetition import RepetitionGuard, cycle_start
from core import metrics


class TokenStream:
    """The tokens of one request as the engine produces them.

    Iterate it with `async for` in the event loop it was created in; `result()` waits for the
    end (in any thread). The engine finishes every stream it accepts, with "stop", "length",
    "repetition" (a cycle stopped by the guard; the tokens end after its first copy),
    "cancelled" or an error."""

    def __init__(self, on_finish: Callable[[], None] | None = None) -> None:
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.cancelled = False
        self._on_finish = on_finish  # called once, in the engine's thread, when the stream ends
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._wake: asyncio.Event | None = asyncio.Event()
        except RuntimeError:
            self._loop = self._wake = None

    # The engine's side
    def _emit(self, token: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            metrics.TIME_TO_FIRST_TOKEN.observe(self.first_token_at - self.submitted_at)
        self.tokens.append(token)
        self._put(token)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        self.finish_reason, self.error, self.finished_at = reason, error, time.perf_counter()
        if self._on_finish is not None:
            self._on_finish()
        self._done.set()
        self._put(None)

    def _put(self, item: int | None) -> None:
        self._events.put(item)
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass

    # The consumer's side
    def cancel(self) -> None:
        """Stop generating at the next step (the stream then ends with "cancelled")."""
        self.cancelled = True

    async def __aiter__(self):
        while True:
            try:
                token = self._events.get_nowait()
            except queue.Empty:
                self._wake.clear()
                if self._events.empty():
                    await self._wake.wait()
                continue
            if token is None:
                break
            yield token
        self._raise_error()

    async def started(self) -> None:
        """Wait for the first token or the end; a stream that failed before its first token
        raises here (so a route can answer with the error before a response has started)."""
        while not self.tokens and not self._done.is_set():
            self._wake.clear()
            if not self.tokens and not self._done.is_set():
                await self._wake.wait()
        if not self.tokens:
            self._raise_error()

    def result(self, timeout: float | None = None) -> list[int]:
        if not self._done.wait(timeout):
            raise TimeoutError("the draft did not finish in time")
        self._raise_error()
        return self.tokens

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def emit(stream: TokenStream, token: int, stop_ids: set[int], guard: RepetitionGuard, max_new_tokens: int) -> bool:
    """Hand a new token to its stream and finish the stream if the draft is done: at a stop
    token, at a cycle the guard stops (the tokens end after its first copy), at the length
    limit, or when the client cancelled. Every backend ends drafts by this one rule."""
    stream._emit(token)
    metrics.GENERATED_TOKENS.inc()
    tokens = stream.tokens
    reason = (
        "stop"
        if token in stop_ids
        else "repetition"
        if guard.stop_cycles and (start := cycle_start(tokens)) is not None
        else "length"
        if len(tokens) >= max_new_tokens
        else "cancelled"
        if stream.cancelled
        else None
    )
    if reason == "repetition":
        del tokens[start:]
    if reason is not None:
        stream._finish(reason)
    return reason is not None
