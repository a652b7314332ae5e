"""The serving engine: one base model, every tenant's adapter, continuous batching.

Decoding one token reads every weight of the model once, so on a CPU it is bound by memory
bandwidth. The engine stays close to that bound in two ways:

- a hand-written Llama forward pass over the base weights (q/k/v and gate/up fused into one
  matmul each, a preallocated KV cache, matrix-vector products split across both threads)
  removes most of the per-token framework overhead of `generate`;
- every request in flight is decoded in the same step, whatever its tenant: the base weights are
  read once per step for all rows, and each row adds its own LoRA adapter's low-rank update.

Requests wait in a bounded queue; past its bound `submit` raises `Overloaded`. A worker thread
admits queued requests between decode steps (prefilling each prompt), so a new request never
waits for the current batch to finish. Greedy decoding only, with each row's own repetition
guard (agent/repetition.py); the output matches `generate` with the same weights and the same
`repetition_penalty` / `no_repeat_ngram_size` (checked in the tests).
"""

import asyncio
import math
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from agent.adapters import INPUT_GROUPS, AdapterCache, AdapterRef, LoraWeights
from agent.repetition import RepetitionGuard, RowPenalties, cycle_start
from core.errors import Overloaded

PLAIN_GREEDY = RepetitionGuard()
_CLOSE = object()  # queued by Engine.close: the worker thread ends once its rows are done


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

    def result(self, timeout: float | None = None) -> list[int]:
        if not self._done.wait(timeout):
            raise TimeoutError("the draft did not finish in time")
        self._raise_error()
        return self.tokens

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error


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


@dataclass
class _LayerWeights:
    qkv: "_Weight"  # [q + k + v out, hidden]
    o: "_Weight"
    gate_up: "_Weight"  # [2 * intermediate, hidden]
    down: "_Weight"
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor


@dataclass
class _BatchLora:
    """The adapters of the rows in a batch, stacked so that each layer needs one matmul per input
    group plus one per projection, however many adapters there are."""

    a: list[dict[str, torch.Tensor]]  # per layer and group: [in, columns of every adapter]
    b: list[dict[str, torch.Tensor]]  # per layer and projection: [its columns of every adapter, out]
    cols: dict[str, tuple[int, int]]  # a projection's columns in its group's stacked A
    row_mask: dict[str, torch.Tensor | None] = field(default_factory=dict)  # per group: [rows, columns]


class Engine:
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
    ):
        config = model.config
        if config.model_type != "llama" or getattr(config, "attention_bias", False) or config.mlp_bias:
            raise ValueError("the serving engine runs Llama-architecture models without biases")
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.dtype = model.dtype
        self.device = model.device
        self.stop_ids = set(stop_ids)
        self.adapters = adapters
        self.max_batch, self.max_length, self.batch_window_s = max_batch, max_length, batch_window_s

        base = model.model
        self.embed = base.embed_tokens.weight.detach()
        self.lm_head = _Weight(model.lm_head.weight.detach())
        self.final_norm = base.norm.weight.detach()
        self.layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _LayerWeights(
                    qkv=_Weight(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()),
                    o=_Weight(attn.o_proj.weight.detach()),
                    gate_up=_Weight(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()),
                    down=_Weight(mlp.down_proj.weight.detach()),
                    input_norm=layer.input_layernorm.weight.detach(),
                    post_attention_norm=layer.post_attention_layernorm.weight.detach(),
                )
            )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.intermediate = config.intermediate_size
        self.out_sizes = {  # of each adaptable projection, for its slice of a fused output
            "q_proj": self.q_size,
            "k_proj": self.kv_size,
            "v_proj": self.kv_size,
            "o_proj": self.q_size,
            "gate_proj": self.intermediate,
            "up_proj": self.intermediate,
            "down_proj": config.hidden_size,
        }
        # RoPE from the model's own rotary module, so positions match generate's exactly.
        positions = torch.arange(max_length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = base.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_length, head_dim]
        shape = (max_batch, self.num_kv_heads, max_length, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in base.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in base.layers]

        self._queue: queue.Queue[_Request] = queue.Queue(maxsize=max_queue)
        self._rows: list[_Row] = []
        self._lora: _BatchLora | None = None
        self._lora_key: tuple | None = None
        self._stacks: OrderedDict[tuple[int, ...], _BatchLora] = OrderedDict()
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
        OpenMP team, which would otherwise slow the process's later torch work: in_fresh_thread)."""
        with self._start_lock:
            if self._thread is not None:
                self._queue.put(_CLOSE)
                self._thread.join()
                self._thread = None

    # The worker thread
    def _run(self) -> None:
        closing = False
        while not closing or self._rows:
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
            # Loaded here, on the engine's thread: see in_fresh_thread for why no other thread
            # should run parallel torch work in a serving process.
            row.adapter = self.adapters.get(request.adapter) if request.adapter is not None else None
            if request.guard.processes_logits:
                row.penalties = RowPenalties(request.guard, request.prompt, self.lm_head.full.shape[0], self.device)
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
        row.stream._emit(row.next_token)
        tokens = row.stream.tokens
        reason = (
            "stop"
            if row.next_token in self.stop_ids
            else "repetition"
            if row.guard.stop_cycles and (start := cycle_start(tokens)) is not None
            else "length"
            if len(tokens) >= row.max_new_tokens
            else "cancelled"
            if row.stream.cancelled
            else None
        )
        if reason == "repetition":
            del tokens[start:]
        if reason is not None:
            row.stream._finish(reason)
            self._durations.append(row.stream.finished_at - row.stream.submitted_at)
            self._retire(slot)

    def _retire(self, slot: int) -> None:
        """Free a slot; the last row moves into it so that the rows stay contiguous in the cache."""
        last = len(self._rows) - 1
        if slot != last:
            moved = self._rows[last]
            for cache in (*self.k_cache, *self.v_cache):
                cache[slot, :, : moved.length] = cache[last, :, : moved.length]
            self._rows[slot] = moved
        self._rows.pop()

    # The model
    @torch.inference_mode()
    def _prefill(self, slot: int, prompt: list[int], adapter: LoraWeights | None) -> torch.Tensor:
        """Fill the slot's cache with the prompt; returns the logits after it ([1, vocab])."""
        tokens = torch.tensor(prompt, device=self.device)
        n = len(prompt)
        lora = self._batch_lora([adapter], rows=n)
        cos, sin = self.cos[:n, None], self.sin[:n, None]

        def attend(layer: int, q, k, v):
            self.k_cache[layer][slot, :, :n] = k[0]
            self.v_cache[layer][slot, :, :n] = v[0]
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        hidden = self._forward(tokens, lora, cos, sin, attend, batch=1, length=n)
        return self._logits(hidden[-1:])

    @torch.inference_mode()
    def _step(self) -> None:
        rows = self._rows
        n = len(rows)
        tokens = torch.tensor([row.next_token for row in rows], device=self.device)
        positions = torch.tensor([row.length for row in rows], device=self.device)
        span = max(row.length for row in rows) + 1
        visible = torch.arange(span, device=self.device)[None] <= positions[:, None]  # [rows, span]
        mask = visible[:, None, None, :]
        slots = torch.arange(n, device=self.device)
        lora = self._batch_lora([row.adapter for row in rows], rows=1)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]

        def attend(layer: int, q, k, v):
            k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
            k_cache[slots, :, positions] = k[:, :, 0]
            v_cache[slots, :, positions] = v[:, :, 0]
            return F.scaled_dot_product_attention(
                q, k_cache[:n, :, :span], v_cache[:n, :, :span], attn_mask=mask, enable_gqa=True
            )

        hidden = self._forward(tokens, lora, cos, sin, attend, batch=n, length=1)
        next_tokens = self._choose(self._logits(hidden), rows)
        self.steps += 1
        for row, token in zip(rows, next_tokens, strict=True):
            row.length += 1
            row.next_token = token
        for slot in reversed(range(n)):  # reversed: retiring moves only rows already handled
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

    def _forward(self, tokens, lora: _BatchLora | None, cos, sin, attend, *, batch: int, length: int):
        """The decoder layers on `tokens` ([batch * length]); returns the final hidden states.
        `cos` and `sin` are per token ([batch * length, 1, head_dim])."""
        x = F.embedding(tokens, self.embed)
        rows, heads = batch * length, self.num_heads + self.num_kv_heads
        for index, weights in enumerate(self.layers):
            h = self._norm(x, weights.input_norm)
            qkv = self._project(h, weights.qkv, lora, index, "attn_in")
            qk = _rope(qkv[:, : self.q_size + self.kv_size].view(rows, heads, self.head_dim), cos, sin)
            v = qkv[:, self.q_size + self.kv_size :].view(batch, length, self.num_kv_heads, self.head_dim)
            q, k = qk.view(batch, length, heads, self.head_dim).split([self.num_heads, self.num_kv_heads], dim=2)
            attended = attend(index, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            attended = attended.transpose(1, 2).reshape(rows, self.q_size)
            x = x + self._project(attended, weights.o, lora, index, "attn_out")
            h = self._norm(x, weights.post_attention_norm)
            gate, up = self._project(h, weights.gate_up, lora, index, "mlp_in").split(self.intermediate, dim=-1)
            x = x + self._project(F.silu(gate) * up, weights.down, lora, index, "mlp_out")
        return x

    def _logits(self, hidden):
        return _matmul(self._norm(hidden, self.final_norm), self.lm_head)

    def _norm(self, x, weight):
        """RMSNorm as Llama computes it: in float32, scaled in the model's dtype."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, self.eps)  # one fused op, the same arithmetic
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)

    def _project(self, x, weight, lora: _BatchLora | None, layer: int, group: str):
        """x @ weight^T plus each row's own LoRA update for the projections of this input group."""
        out = _matmul(x, weight)
        if lora is None or group not in lora.a[layer]:
            return out
        xa = x @ lora.a[layer][group]
        if (mask := lora.row_mask[group]) is not None:
            xa = xa * mask
        offset = 0
        for proj in INPUT_GROUPS[group]:
            size = self.out_sizes[proj]
            if proj in lora.cols:
                start, end = lora.cols[proj]
                out[:, offset : offset + size].addmm_(xa[:, start:end], lora.b[layer][proj])
            offset += size
        return out

    def _batch_lora(self, adapters: list[LoraWeights | None], rows: int) -> _BatchLora | None:
        """The stacked adapters of a batch, one entry of `adapters` per sequence of `rows` positions.

        Rebuilt only when the batch's composition changes (a request joins or leaves), not every
        step; a batch of one adapter needs no copy and no mask."""
        key = (tuple(a.id if a else None for a in adapters), rows)
        if key == self._lora_key:
            return self._lora
        present = sorted({a.id: a for a in adapters if a is not None}.values(), key=lambda a: a.id)
        lora = None
        if len(present) == 1:
            lora = _BatchLora(a=present[0].a, b=present[0].b, cols=present[0].cols)
        elif present:
            ids = tuple(a.id for a in present)
            if ids not in self._stacks:
                self._stacks[ids] = _stack(present)
                if len(self._stacks) > 2:  # stacks are large: keep the current and the previous
                    self._stacks.popitem(last=False)
            stacked = self._stacks[ids]
            lora = _BatchLora(a=stacked.a, b=stacked.b, cols=stacked.cols)
        if lora is not None:
            uniform = len(present) == 1 and None not in key[0]
            for group, members in INPUT_GROUPS.items():
                if uniform or group not in lora.a[0]:
                    lora.row_mask[group] = None
                    continue
                mask = torch.zeros(len(adapters), lora.a[0][group].shape[1], dtype=self.dtype, device=self.device)
                for row, adapter in enumerate(adapters):
                    for proj in (p for p in members if adapter is not None and p in adapter.cols):
                        start, end = _adapter_cols(lora, present, adapter, proj)
                        mask[row, start:end] = 1
                lora.row_mask[group] = mask.repeat_interleave(rows, dim=0)
        self._lora, self._lora_key = lora, key
        return lora


def in_fresh_thread(fn, *args):
    """Run fn(*args) in a new thread that ends with it, and return its result.

    A thread that has run parallel torch work keeps an OpenMP team for as long as it lives, and
    libgomp stops spin-waiting once a process has more OpenMP threads than cores: with one idle
    team beside the engine's, decode steps took 65-70 ms instead of 43 (measured, 2 cores).
    One-off work in a serving process (loading the model) therefore runs in a thread that ends."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as error:  # re-raised in the caller
            box["error"] = error

    thread = threading.Thread(target=run, name="draftloop-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


SPLIT_BELOW = 64  # inputs of fewer rows (decode steps) use the row-split matrix product


class _Weight:
    """A weight matrix [out, in] and the same memory as two halves of its rows, transposed."""

    def __init__(self, weight: torch.Tensor):
        self.full = weight
        self.halves = weight.view(2, weight.shape[0] // 2, weight.shape[1]).transpose(1, 2)


def _matmul(x, weight: _Weight):
    """x @ weight^T. For a few rows, MKL's matrix-vector product runs on one thread and reaches
    about half the memory bandwidth (measured: 11 of 23-30 GB/s on 2 cores); multiplying the two
    halves of the weight's rows as a batch of two runs one half per thread (1.5x faster)."""
    rows = x.shape[0]
    if rows >= SPLIT_BELOW:
        return F.linear(x, weight.full)
    halves = torch.bmm(x.expand(2, rows, x.shape[1]), weight.halves)  # [2, rows, out / 2]
    return halves.view(1, -1) if rows == 1 else halves.transpose(0, 1).reshape(rows, -1)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _stack(adapters: list[LoraWeights]) -> _BatchLora:
    """Adapters side by side: in each group's A, the columns of projection p of every adapter
    are contiguous (adapter order), so each projection's update is still a single matmul."""
    projections = [p for members in INPUT_GROUPS.values() for p in members if any(p in a.cols for a in adapters)]
    cols: dict[str, tuple[int, int]] = {}
    for members in INPUT_GROUPS.values():
        start = 0
        for proj in (p for p in members if p in projections):
            width = sum(_width(a, proj) for a in adapters)
            cols[proj] = (start, start + width)
            start += width
    a_layers, b_layers = [], []
    for layer in range(len(adapters[0].a)):
        a_layers.append({})
        b_layers.append({})
        for group, members in INPUT_GROUPS.items():
            parts = []
            for proj in (p for p in members if p in projections):
                for adapter in adapters:
                    if proj in adapter.cols:
                        start, end = adapter.cols[proj]
                        parts.append(adapter.a[layer][group][:, start:end])
                        b_layers[layer].setdefault(proj, []).append(adapter.b[layer][proj])
            if parts:
                a_layers[layer][group] = torch.cat(parts, dim=1)
        b_layers[layer] = {proj: torch.cat(parts) for proj, parts in b_layers[layer].items()}
    return _BatchLora(a=a_layers, b=b_layers, cols=cols)


def _width(adapter: LoraWeights, proj: str) -> int:
    if proj not in adapter.cols:
        return 0
    start, end = adapter.cols[proj]
    return end - start


def _adapter_cols(lora: _BatchLora, present: list[LoraWeights], adapter: LoraWeights, proj: str) -> tuple[int, int]:
    """Where one adapter's columns for a projection sit in the batch's stacked A."""
    start = lora.cols[proj][0]
    for other in present:
        if other.id == adapter.id:
            return start, start + _width(other, proj)
        start += _width(other, proj)
    raise KeyError(adapter.id)
