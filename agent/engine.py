"""The serving engine: one base model, every tenant's adapter, continuous batching.

Decoding one token reads every weight of the model once, so on a CPU it is bound by memory
bandwidth. The engine stays close to that bound in two ways:

- its own Llama forward pass over the base weights (agent/llama.py), with a preallocated KV
  cache (agent/kv_cache.py), removes most of the per-token framework overhead of `generate`;
- every request in flight is decoded in the same step, whatever its tenant: the base weights are
  read once per step for all rows, and each row adds its own LoRA adapter's low-rank update (rows
  grouped by adapter: agent/adapters.py).

This module is the scheduler. Requests wait in a bounded queue; past its bound `submit` raises
`Overloaded`. A worker thread admits queued requests between decode steps (prefilling each
prompt), so a new request never waits for the current batch to finish; a finished row leaves
its slot to the last row, so the batch stays contiguous in the cache. Greedy decoding only,
with each row's own repetition guard (agent/repetition.py); the output matches `generate` with
the same weights and the same `repetition_penalty` / `no_repeat_ngram_size` (checked in the
tests).
"""

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from agent.adapters import AdapterCache, AdapterRef, BatchStacker, LoraWeights
from agent.kv_cache import KVCache
from agent.llama import Llama
from agent.repetition import RepetitionGuard, RowPenalties
from agent.stream import TokenStream, emit
from core import metrics
from core.errors import Overloaded

PLAIN_GREEDY = RepetitionGuard()
_CLOSE = object()  # queued by Engine.close: the worker thread ends once its rows are done


@dataclass
class _Row:
    stream: TokenStream
    adapter: LoraWeights | None
    max_new_tokens: int
    length: int  # tokens in the KV cache
    next_token: int  # generated, not yet in the cache
    guard: RepetitionGuard
    penalties: RowPenalties | None = None  # when the guard adjusts logits


@dataclass
class _Request:
    prompt: list[int]
    max_new_tokens: int
    adapter: AdapterRef | None
    guard: RepetitionGuard
    stream: TokenStream


class Engine:
    """The in-process backend (agent/drafting.Backend)."""

    name = "local"

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        stop_ids: list[int],
        adapters: AdapterCache,
        max_batch: int,
        max_queue: int,
        max_length: int,
        batch_window_s: float = 0.005,
        weights: str = "float",
    ):
        self.model = Llama(model, max_length, weights)
        self.device = self.model.device
        self.stop_ids = set(stop_ids)
        self.adapters = adapters
        self.max_batch, self.max_length, self.batch_window_s = max_batch, max_length, batch_window_s
        self.cache = KVCache(self.model, max_batch, max_length)
        self.stacker = BatchStacker(self.device)
        self._queue: queue.Queue[_Request] = queue.Queue(maxsize=max_queue)
        self._rows: list[_Row] = []
        self._durations: deque[float] = deque(maxlen=32)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.steps = 0  # decode steps run, for the benchmarks

    # Submitting
    def submit(
        self,
        prompt: list[int],
        max_new_tokens: int,
        adapter: AdapterRef | None,
        guard: RepetitionGuard = PLAIN_GREEDY,
        on_finish: Callable[[], None] | None = None,
    ) -> TokenStream:
        """Queue a prompt for greedy decoding; the returned stream yields the new tokens.
        `on_finish` is called when the stream ends (in the engine's thread)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + max_new_tokens > self.max_length:
            raise ValueError(
                f"{len(prompt)} prompt tokens + {max_new_tokens} new tokens exceed the engine's {self.max_length}"
            )
        stream = TokenStream(on_finish)
        self._start()
        try:
            self._queue.put_nowait(_Request(prompt, max_new_tokens, adapter, guard, stream))
        except queue.Full:
            retry = self.retry_after_s()
            raise Overloaded(
                f"the drafting queue is full ({self._queue.maxsize} waiting, {self.max_batch} in progress); "
                f"retry in {retry} s",
                retry_after_s=retry,
            ) from None
        return stream

    def retry_after_s(self) -> int:
        """Seconds until a place in the queue is likely free: a recent draft's mean duration."""
        return max(1, math.ceil(sum(self._durations) / len(self._durations))) if self._durations else 1

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="draft-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Finish the requests already submitted, then end the worker thread (and with it its
        OpenMP team, which would otherwise slow the process's later torch work: see
        agent/threads.in_fresh_thread)."""
        with self._start_lock:
            if self._thread is not None:
                self._queue.put(_CLOSE)
                self._thread.join()
                self._thread = None

    # The worker thread
    def _run(self) -> None:
        closing = False
        while not closing or self._rows:
            metrics.QUEUE_DEPTH.set(self._queue.qsize())
            waiting: list[_Request] = []
            if not self._rows and not closing:
                waiting.append(self._queue.get())  # idle: sleep until a request comes
                deadline = time.perf_counter() + self.batch_window_s
                while len(waiting) < self.max_batch and (wait := deadline - time.perf_counter()) > 0:
                    try:
                        waiting.append(self._queue.get(timeout=wait))
                    except queue.Empty:
                        break
            while len(self._rows) + len(waiting) < self.max_batch:
                try:
                    waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for request in waiting:
                if request is _CLOSE:
                    closing = True
                else:
                    self._admit(request)
            if self._rows:
                try:
                    self._step()
                except Exception as error:  # finish every stream rather than leave clients waiting
                    for row in self._rows:
                        row.stream._finish("error", error)
                    self._rows.clear()

    @torch.inference_mode()
    def _admit(self, request: _Request) -> None:
        if request.stream.cancelled:
            request.stream._finish("cancelled")
            return
        slot = len(self._rows)
        row = _Row(request.stream, None, request.max_new_tokens, length=0, next_token=-1, guard=request.guard)
        self._rows.append(row)
        try:
            # Loaded here, on the engine's thread: see agent/threads.in_fresh_thread for why no other
            # thread should run parallel torch work in a serving process.
            row.adapter = self.adapters.get(request.adapter) if request.adapter is not None else None
            if request.guard.processes_logits:
                row.penalties = RowPenalties(request.guard, request.prompt, self.model.vocab_size, self.device)
            row.next_token = self._choose(self._prefill(slot, request.prompt, row.adapter), [row])[0]
            row.length = len(request.prompt)
        except Exception as error:
            self._rows.pop()
            request.stream._finish("error", error)
            return
        self._emitted(slot)

    def _emitted(self, slot: int) -> None:
        """Hand the row's new token to its stream; retire the row if it is done."""
        row = self._rows[slot]
        if emit(row.stream, row.next_token, self.stop_ids, row.guard, row.max_new_tokens):
            self._durations.append(row.stream.finished_at - row.stream.submitted_at)
            self._retire(slot)

    def _retire(self, slot: int) -> None:
        """Free a slot; the last row moves into it so that the rows stay contiguous in the cache."""
        last = len(self._rows) - 1
        if slot != last:
            moved = self._rows[last]
            self.cache.move(last, slot, moved.length)
            self._rows[slot] = moved
        self._rows.pop()

    # The model's steps
    @torch.inference_mode()
    def _prefill(self, slot: int, prompt: list[int], adapter: LoraWeights | None) -> torch.Tensor:
        """Fill the slot's cache with the prompt; returns the logits after it ([1, vocab])."""
        tokens = torch.tensor(prompt, device=self.device)
        lora = self.stacker.stack([adapter], rows=len(prompt))
        return self.model.prefill([tokens], lora, self.cache.prefill_attention([slot], [len(prompt)]))

    @torch.inference_mode()
    def _step(self) -> None:
        rows = self._rows
        started = time.perf_counter()
        tokens = torch.tensor([row.next_token for row in rows], device=self.device)
        positions = torch.tensor([row.length for row in rows], device=self.device)
        attend = self.cache.decode_attention(positions, span=max(row.length for row in rows) + 1)
        lora = self.stacker.stack([row.adapter for row in rows], rows=1)
        next_tokens = self._choose(self.model.decode(tokens, positions, lora, attend), rows)
        self.steps += 1
        metrics.STEP_DURATION.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(rows))
        for row, token in zip(rows, next_tokens, strict=True):
            row.length += 1
            row.next_token = token
        for slot in reversed(range(len(rows))):  # reversed: retiring moves only rows already handled
            self._emitted(slot)

    @staticmethod
    def _choose(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Each row's greedy token ([rows, vocab] logits), after its own repetition penalties
        (in float32, as `generate` applies its logits processors)."""
        penalised = [(i, row.penalties) for i, row in enumerate(rows) if row.penalties is not None]
        if penalised:
            logits = logits.float()
            for i, penalties in penalised:
                penalties.apply(logits[i])
        tokens = logits.argmax(-1).tolist()
        for i, penalties in penalised:
            penalties.push(tokens[i])
        return tokens
