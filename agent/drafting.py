"""Drafting replies: the tenant's prompt, greedy decoding, stop at the end of the turn; with the
tenant's adapter when it has one."""

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from agent.adapters import AdapterRef, attach
from agent.model import LoadedModel, load_base_model
from agent.prompt import IncomingEmail, build_messages, fit_messages, prompt_token_ids
from core.settings import Settings, get_settings


@dataclass(frozen=True)
class DraftResult:
    text: str
    tokens_generated: int  # including the end-of-turn token when there is one
    prompt_tokens: int
    latency_ms: float  # the whole draft call, including any wait for the model
    finish_reason: str  # "stop" | "length"


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-turn ids: the tokenizer's eos, the model's configured eos, and ChatML's <|im_end|>."""
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.get_vocab().get("<|im_end|>"))
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no end-of-sequence token")
    return sorted(ids)


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
    def __init__(self, loaded: LoadedModel, settings: Settings):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.fingerprint = loaded.fingerprint
        self.settings = settings
        self.stop_ids = stop_token_ids(loaded.model, loaded.tokenizer)
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else self.stop_ids[0]
        self._lock = threading.Lock()  # one generation at a time on the shared model

    def draft(
        self,
        instructions: str,
        email: IncomingEmail,
        *,
        max_new_tokens: int | None = None,
        adapter: AdapterRef | None = None,
    ) -> DraftResult:
        """Draft a reply to one email following the tenant's instructions, with the tenant's
        adapter if it has one (loaded on first use, then kept), else with the bare base model."""
        return self.draft_many(instructions, [email], max_new_tokens=max_new_tokens, adapter=adapter)[0]

    def draft_many(
        self,
        instructions: str,
        emails: list[IncomingEmail],
        *,
        max_new_tokens: int | None = None,
        adapter: AdapterRef | None = None,
    ) -> list[DraftResult]:
        """Draft replies to several emails of one tenant in one batch (latency is the batch's)."""
        started = time.perf_counter()
        limit = self.settings.max_new_tokens_limit
        if max_new_tokens is None:
            max_new_tokens = min(self.settings.max_new_tokens, limit)
        if not 1 <= max_new_tokens <= limit:
            raise ValueError(f"max_new_tokens must be between 1 and {limit}, got {max_new_tokens}")
        prompts = []
        for email in emails:
            messages = build_messages(instructions, email, quoted_history_chars=self.settings.quoted_history_chars)
            messages = fit_messages(self.tokenizer, messages, self.settings.max_prompt_tokens)
            prompts.append(prompt_token_ids(self.tokenizer, messages))
        with self._lock:
            if adapter is not None:
                self.model = attach(self.model, adapter)
            # With adapters loaded, a tenant without one drafts on the bare base weights.
            bare = adapter is None and isinstance(self.model, PeftModel)
            with self.model.disable_adapter() if bare else nullcontext():
                outputs = generate_greedy(
                    self.model, prompts, max_new_tokens=max_new_tokens, stop_ids=self.stop_ids, pad_id=self.pad_id
                )
        latency_ms = (time.perf_counter() - started) * 1000
        return [
            DraftResult(
                text=self.tokenizer.decode(new_ids, skip_special_tokens=True).strip(),
                tokens_generated=len(new_ids),
                prompt_tokens=len(prompt),
                latency_ms=latency_ms,
                finish_reason="stop" if new_ids and new_ids[-1] in self.stop_ids else "length",
            )
            for prompt, new_ids in zip(prompts, outputs, strict=True)
        ]


_drafter: Drafter | None = None
_drafter_lock = threading.Lock()


def get_drafter(settings: Settings | None = None) -> Drafter:
    """The process-wide drafter; the base model is loaded once, by the first caller."""
    global _drafter
    with _drafter_lock:
        if _drafter is None:
            settings = settings or get_settings()
            _drafter = Drafter(load_base_model(settings), settings)
        return _drafter
