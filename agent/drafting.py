"""Drafting replies: the tenant's prompt, greedy decoding, stop at the end of the turn; with the
tenant's adapter when it has one. `generate_greedy` is the plain Hugging Face path (the tests
and the decoding benchmark hold the engine's drafts to it)."""

import dataclasses
import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from agent.adapters import AdapterCache, AdapterRef
from agent.base_model import LoadedModel, fingerprint, load_base_model, load_tokenizer, model_id, model_source
from agent.engine import Engine
from agent.prompt import IncomingEmail, build_messages, fit_messages, prompt_token_ids, stop_token_ids
from agent.remote import RemoteBackend
from agent.repetition import RepetitionGuard
from agent.stream import TokenStream
from agent.threads import in_fresh_thread
from agent.weights import adapter_kernel_dtype, compute_dtype
from core import metrics
from core.errors import RateLimited, RetryLater
from core.settings import Settings, get_settings


@dataclass(frozen=True)
class DraftResult:
    text: str
    tokens_generated: int  # including the end-of-turn token when there is one
    prompt_tokens: int
    latency_ms: float  # from submission to the last token, including any wait in the queue
    finish_reason: str  # "stop" | "length" | "repetition" (a cycle the guard stopped)


class Backend(Protocol):
    """What decodes drafts: the in-process engine (agent/engine.py) or a remote server
    (agent/remote.py). `submit` raises `Overloaded` when no more work fits."""

    name: str  # recorded on each draft: "local", or "remote <url>"

    def submit(
        self,
        prompt: list[int],
        max_new_tokens: int,
        adapter: AdapterRef | None,
        guard: RepetitionGuard,
        on_finish: Callable[[], None] | None = None,
    ) -> TokenStream: ...

    def retry_after_s(self) -> int: ...

    def close(self) -> None: ...


@torch.inference_mode()
def generate_greedy(
    model: PreTrainedModel, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: list[int], pad_id: int
) -> list[list[int]]:
    """Greedy continuations of prompts in one left-padded batch, each cut after its stop token."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )
    continuations = []
    for row in output[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stop_ids), len(row))
        continuations.append(row[:end])
    return continuations


class Drafter:
    """Drafts replies on the shared base model with each tenant's adapter, through a backend:
    concurrent drafts (of any tenants) are decoded together in one batch."""

    def __init__(
        self,
        *,
        tokenizer: PreTrainedTokenizerBase,
        model_id: str,
        fingerprint: str,
        backend: Backend,
        settings: Settings,
    ):
        self.tokenizer, self.model_id, self.fingerprint = tokenizer, model_id, fingerprint
        self.backend = backend
        self.settings = settings
        self.guard = RepetitionGuard(
            repetition_penalty=settings.repetition_penalty,
            no_repeat_ngram_size=settings.no_repeat_ngram_size,
            stop_cycles=settings.stop_repeating_cycles,
        )
        # Drafts in progress or waiting, per tenant, and the most one tenant may have
        self.tenant_limit = max(1, math.floor(settings.tenant_draft_share * (settings.max_batch + settings.max_queue)))
        self._in_flight: Counter[int] = Counter()
        self._shadows_in_flight: Counter[int] = Counter()  # submit_shadow's, counted apart
        self._in_flight_lock = threading.Lock()

    @classmethod
    def local(cls, loaded: LoadedModel, settings: Settings) -> "Drafter":
        """Drafting in this process, by the serving engine over the loaded weights."""
        adapters = AdapterCache(
            settings.adapter_cache_count,
            settings.adapter_cache_mb * 2**20,
            num_layers=loaded.model.config.num_hidden_layers,
            device=loaded.model.device,
            dtype=compute_dtype(loaded.model.dtype, settings.serving_weights),
            kernel_dtype=adapter_kernel_dtype(loaded.model.dtype, settings.serving_weights),
        )
        engine = Engine(
            loaded.model,
            stop_ids=stop_token_ids(loaded.model.generation_config, loaded.tokenizer),
            adapters=adapters,
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
            max_length=settings.max_prompt_tokens + settings.max_new_tokens_limit,
            weights=settings.serving_weights,
        )
        return cls(
            tokenizer=loaded.tokenizer,
            model_id=loaded.model_id,
            fingerprint=loaded.fingerprint,
            backend=engine,
            settings=settings,
        )

    @classmethod
    def remote(cls, settings: Settings) -> "Drafter":
        """Drafting on the server at `remote_url`: this process loads the tokenizer, never the weights."""
        if not settings.remote_url:
            raise ValueError("drafting_backend is remote: set DRAFTLOOP_REMOTE_URL to the drafting server's address")
        source = model_source(settings)
        tokenizer = load_tokenizer(settings)
        base_fingerprint = fingerprint(source)
        backend = RemoteBackend(
            url=settings.remote_url,
            model=settings.remote_model,
            api_key=settings.backend_api_key,
            base_path=source,
            base_fingerprint=base_fingerprint,
            stop_ids=stop_token_ids(GenerationConfig.from_pretrained(source, local_files_only=True), tokenizer),
            max_in_flight=settings.max_batch + settings.max_queue,
            publish_dir=settings.remote_publish_dir,
            load_route=settings.remote_load_route,
            timeout_s=settings.remote_timeout_s,
        )
        return cls(
            tokenizer=tokenizer,
            model_id=model_id(settings),
            fingerprint=base_fingerprint,
            backend=backend,
            settings=settings,
        )

    def prompt(self, instructions: str, email: IncomingEmail) -> list[int]:
        """The token ids the agent drafts from: the one prompt builder, fitted to the prompt budget."""
        messages = build_messages(instructions, email, quoted_history_chars=self.settings.quoted_history_chars)
        messages = fit_messages(self.tokenizer, messages, self.settings.max_prompt_tokens)
        return prompt_token_ids(self.tokenizer, messages)

    def guard_with(self, **overrides) -> RepetitionGuard:
        """The server's repetition guard with a request's own settings (None: the server's)."""
        return dataclasses.replace(self.guard, **{k: v for k, v in overrides.items() if v is not None})

    def submit(
        self,
        prompt: list[int],
        *,
        max_new_tokens: int | None = None,
        adapter: AdapterRef | None = None,
        guard: RepetitionGuard | None = None,
        tenant_id: int | None = None,
    ) -> TokenStream:
        """Start drafting from prompt ids; the stream yields token ids as they are decoded."""
        return self.submit_many(
            [prompt], max_new_tokens=max_new_tokens, adapter=adapter, guard=guard, tenant_id=tenant_id
        )[0]

    def submit_many(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int | None = None,
        adapter: AdapterRef | None = None,
        guard: RepetitionGuard | None = None,
        tenant_id: int | None = None,
    ) -> list[TokenStream]:
        """Start drafting every prompt, or none of them (429 past the tenant's share of the
        drafting queue, 503 when the queue is full)."""
        max_new_tokens = self.settings.reply_length(max_new_tokens)
        self._take_share(tenant_id, len(prompts))
        streams: list[TokenStream] = []
        try:
            for prompt in prompts:
                done = (lambda: self._give_back(tenant_id, 1)) if tenant_id is not None else None
                streams.append(self.backend.submit(prompt, max_new_tokens, adapter, guard or self.guard, done))
        except BaseException:
            for stream in streams:
                stream.cancel()
            self._give_back(tenant_id, len(prompts) - len(streams))
            raise
        return streams

    def submit_shadow(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        adapter: AdapterRef,
        guard: RepetitionGuard,
        tenant_id: int,
    ) -> list[TokenStream] | None:
        """Start best-effort drafts beside a tenant's own, submitted right after them so that they
        decode in the same batch (its shadow adapter's, training/shadow.py); None when they do not
        fit now (counted as shed). They never make the tenant's own drafts wait or fail: they do not count against
        its share, and are taken only while its drafts in flight, these included, leave room for
        them in it (so a tenant's shadows hold at most one share), and only if the queue has room."""
        count = len(prompts)
        with self._in_flight_lock:
            if self._in_flight[tenant_id] + self._shadows_in_flight[tenant_id] + count > self.tenant_limit:
                metrics.SHADOW_DRAFTS.labels("shed").inc(count)
                return None
            self._shadows_in_flight[tenant_id] += count
        streams: list[TokenStream] = []
        length = self.settings.reply_length(max_new_tokens)
        try:
            for prompt in prompts:
                streams.append(
                    self.backend.submit(prompt, length, adapter, guard, lambda: self._shadow_done(tenant_id, 1))
                )
        except RetryLater:
            for stream in streams:
                stream.cancel()
            self._shadow_done(tenant_id, count - len(streams))
            metrics.SHADOW_DRAFTS.labels("shed").inc(count)
            return None
        return streams

    def _shadow_done(self, tenant_id: int, count: int) -> None:
        with self._in_flight_lock:
            self._shadows_in_flight[tenant_id] -= count
            if self._shadows_in_flight[tenant_id] <= 0:
                del self._shadows_in_flight[tenant_id]

    def in_flight(self, tenant_id: int) -> int:
        """The tenant's drafts in progress or waiting."""
        with self._in_flight_lock:
            return self._in_flight[tenant_id]

    def _take_share(self, tenant_id: int | None, count: int) -> None:
        if tenant_id is None:
            return
        with self._in_flight_lock:
            if self._in_flight[tenant_id] + count > self.tenant_limit:
                raise RateLimited(
                    f"this tenant has {self._in_flight[tenant_id]} drafts in progress or waiting; its share of the "
                    f"drafting queue is {self.tenant_limit}: retry when some have finished",
                    retry_after_s=self.backend.retry_after_s(),
                )
            self._in_flight[tenant_id] += count

    def _give_back(self, tenant_id: int | None, count: int) -> None:
        if tenant_id is None or count == 0:
            return
        with self._in_flight_lock:
            self._in_flight[tenant_id] -= count
            if self._in_flight[tenant_id] <= 0:
                del self._in_flight[tenant_id]

    def close(self) -> None:
        """Finish the drafts in progress and stop the backend's threads (for one-off drafting,
        such as an evaluation inside a training worker)."""
        self.backend.close()

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def draft(
        self,
        instructions: str,
        email: IncomingEmail,
        *,
        max_new_tokens: int | None = None,
        adapter: AdapterRef | None = None,
        guard: RepetitionGuard | None = None,
    ) -> DraftResult:
        """Draft a reply to one email following the tenant's instructions, with the tenant's
        adapter if it has one, else with the bare base model."""
        return self.draft_many(instructions, [email], max_new_tokens=max_new_tokens, adapter=adapter, guard=guard)[0]

    def draft_many(
        self,
        instructions: str,
        emails: list[IncomingEmail],
        *,
        max_new_tokens: int | None = None,
        adapter: AdapterRef | None = None,
        guard: RepetitionGuard | None = None,
    ) -> list[DraftResult]:
        """Draft replies to several emails of one tenant; they are decoded side by side."""
        prompts = [self.prompt(instructions, email) for email in emails]
        streams = self.submit_many(prompts, max_new_tokens=max_new_tokens, adapter=adapter, guard=guard)
        return [self.result(prompt, stream) for prompt, stream in zip(prompts, streams, strict=True)]

    def result(self, prompt: list[int], stream: TokenStream) -> DraftResult:
        """Wait for a stream to end and describe the draft it produced."""
        tokens = stream.result()
        return DraftResult(
            text=self.text(tokens),
            tokens_generated=len(tokens),
            prompt_tokens=len(prompt),
            latency_ms=(stream.finished_at - stream.submitted_at) * 1000,
            finish_reason=stream.finish_reason,
        )


class IncrementalText:
    """A growing list of token ids as text deltas: each call returns the text the new tokens
    added (a token that ends inside a multi-byte character waits for the next one)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.sent = ""

    def delta(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


_drafter: Drafter | None = None
_drafter_lock = threading.Lock()


def get_drafter(settings: Settings | None = None) -> Drafter:
    """The process-wide drafter; the base model is loaded once, by the first caller."""
    global _drafter
    with _drafter_lock:
        if _drafter is None:
            settings = settings or get_settings()
            if settings.drafting_backend == "remote":
                _drafter = Drafter.remote(settings)
            else:
                _drafter = in_fresh_thread(lambda: Drafter.local(load_base_model(settings), settings))
        return _drafter
