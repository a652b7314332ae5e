"""The serving engine: one base model, every tenant's adapter, continuous batching.

Decoding one token reads every weight of the model once, so on a CPU it is bound by memory
bandwidth. The engine stays close to that bound in two ways:

- its own Llama forward pass over the base weights (agent/llama.py), with a preallocated KV
  cache (agent/kv_cache.py), removes most of the per-token framework overhead of `generate`;
- every request in flight is decoded in the same step, whatever its tenant: the base weights are
  read once per step for all rows, and each row adds its own LoRA adapter's low-rank update (rows
  grouped by adapter: agent/adapters.py).

This module is the scheduler. Requests wait in a bounded queue; past its bound `submit` raises
`Overloaded`. A worker thread admits queued requests between decode steps, so a new request
never waits for the current batch to finish: one pack of them per step, their prompts
prefilled together in one forward (up to PREFILL_PACK_TOKENS tokens, so that a long queue does
not hold up the rows in flight). A finished row leaves its slot to the last row, so the batch
stays contiguous in the cache. Greedy decoding only, with each row's own repetition guard
(agent/repetition.py); the output matches `generate` with the same weights and the same
`repetition_penalty` / `no_repeat_ngram_size` (checked in the tests).
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

from agent.adapters import AdapterCache, AdapterRef, BatchStacker, LoraWeights, pack_lora
from agent.kv_cache import KVCache
from agent.llama import Llama
from agent.repetition import RepetitionGuard, RowPenalties
from agent.stream import TokenStream, emit
from core import metrics
from core.errors import Overloaded

PLAIN_GREEDY = RepetitionGuard()
# Prompt tokens prefilled in one forward at most (a longer prompt goes alone). Packing pays most
# for short prompts, whose matrix products are small: 8 prompts of about 45 tokens prefilled
# 1.5-1.6x faster packed than one by one, 4 or 8 sample emails' prompts (165-240 tokens)
# 1.1-1.2x, and past a few hundred rows the time per token falls little more (float32 on 2
# cores, no adapter: 3.2 ms a token for a short prompt alone, 2.1 for a sample one alone; 2.0
# packed at 371 rows, 1.6 at 813, 1.5 at 1586; bench/results/prefill.json). A pack's forward
# holds up the next decode step of the rows in flight, about 2 ms a token here, so a pack
# stays around two sample prompts.
PREFILL_PACK_TOKENS = 512
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
        if adapters.dtype != self.model.dtype:
            raise ValueError(f"the adapter cache holds {adapters.dtype}, the forward computes in {self.model.dtype}")
        self.device = self.model.device
        self.stop_ids = set(stop_ids)
        self.adapters = adapters
        self.max_batch, self.max_length, self.batch_window_s = max_batch, max_length, batch_window_s
        self.cache = KVCache(self.model, max_batch, max_length)
        self.stacker = BatchStacker(self.device)
        self._queue: queue.Queue[_Request] = queue.Queue(maxsize=max_queue)
        self._waiting: deque[_Request] = deque()  # taken from the queue, not yet admitted
        self._rows: list[_Row] = []
        self._durations: deque[float] = deque(maxlen=32)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.steps = 0  # decode steps run, for the benchmarks
        self.prefills = 0  # prefill forwards run (one per pack), for the tests and benchmarks
        self.prefilled = 0  # prompts prefilled

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
        while not closing or self._rows or self._waiting:
            metrics.QUEUE_DEPTH.set(self._queue.qsize() + len(self._waiting))
            taken: list = []
            if not self._rows and not self._waiting and not closing:
                taken.append(self._queue.get())  # idle: sleep until a request comes
                deadline = time.perf_counter() + self.batch_window_s
                while (
                    taken[-1] is not _CLOSE
                    and len(taken) < self.max_batch
                    and (wait := deadline - time.perf_counter()) > 0
                ):
                    try:
                        taken.append(self._queue.get(timeout=wait))
                    except queue.Empty:
                        break
            # Only as many as there are free slots: the others stay in the bounded queue.
            while len(self._rows) + len(self._waiting) + len(taken) < self.max_batch:
                try:
                    taken.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for item in taken:
                if item is _CLOSE:
                    closing = True
                else:
                    self._waiting.append(item)
            if self._waiting:
                self._admit(self._next_pack())
            if self._rows:
                try:
                    self._step()
                except Exception as error:  # finish every stream rather than leave clients waiting
                    for row in self._rows:
                        row.stream._finish("error", error)
                    self._rows.clear()

    def _next_pack(self) -> list[_Request]:
        """The waiting requests to prefill together: the first, and those after it in order while
        their prompts total at most PREFILL_PACK_TOKENS tokens. Each has a free slot: no more
        requests wait than there are."""
        pack = [self._waiting.popleft()]
        tokens = len(pack[0].prompt)
        while self._waiting and tokens + len(self._waiting[0].prompt) <= PREFILL_PACK_TOKENS:
            tokens += len(self._waiting[0].prompt)
            pack.append(self._waiting.popleft())
        return pack

    @torch.inference_mode()
    def _admit(self, requests: list[_Request]) -> None:
        """Prefill a pack of requests in one forward; each becomes a row of the batch. A request
        cancelled before it starts, or whose adapter or penalties cannot be set up, finishes
        alone and the others go on; if the forward fails, every request of the pack fails."""
        rows, prompts = [], []
        for request in requests:
            if request.stream.cancelled:
                request.stream._finish("cancelled")
                continue
            try:
                # Loaded here, on the engine's thread: see agent/threads.in_fresh_thread for why no
                # other thread should run parallel torch work in a serving process.
                adapter = self.adapters.get(request.adapter) if request.adapter is not None else None
                penalties = None
                if request.guard.processes_logits:
                    penalties = RowPenalties(request.guard, request.prompt, self.model.vocab_size, self.device)
            except Exception as error:
                request.stream._finish("error", error)
                continue
            rows.append(
                _Row(
                    request.stream,
                    adapter,
                    request.max_new_tokens,
                    length=len(request.prompt),
                    next_token=-1,
                    guard=request.guard,
                    penalties=penalties,
                )
            )
            prompts.append(request.prompt)
        if not rows:
            return
        first = len(self._rows)
        try:
            logits = self._prefill(list(range(first, first + len(rows))), prompts, [row.adapter for row in rows])
            tokens = self._choose(logits, rows)
        except Exception as error:
            for row in rows:
                row.stream._finish("error", error)
            return
        for row, token in zip(rows, tokens, strict=True):
            row.next_token = token
        self._rows.extend(rows)
        for slot in reversed(range(first, len(self._rows))):  # reversed: retiring moves only rows already handled
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
    def _prefill(self, slots: list[int], prompts: list[list[int]], adapters: list[LoraWeights | None]) -> torch.Tensor:
        """Fill each slot's cache with its prompt, all in one forward; returns the logits after
        each prompt ([prompts, vocab])."""
        lengths = [len(prompt) for prompt in prompts]
        tokens = [torch.tensor(prompt, device=self.device) for prompt in prompts]
        attend = self.cache.prefill_attention(slots, lengths)
        logits = self.model.prefill(tokens, pack_lora(adapters, lengths), attend)
        self.prefills += 1
        self.prefilled += len(prompts)
        return logits

    @torch.inference_mode()
    def _step(self) -> None:
        rows = self._rows
        started = time.perf_counter()
        tokens = torch.tensor([row.next_token for row in rows], device=self.device)
        positions = torch.tensor([row.length for row in rows], device=self.device)
        attend = self.cache.decode_attention(positions, span=max(row.length for row in rows) + 1)
        lora = self.stacker.stack([row.adapter for row in rows])
        next_tokens = self._choose(self.model.decode(tokens, lora, attend), rows)
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
