"""The serving engine against the plain Hugging Face path: the same greedy tokens for the base
model and for every adapter, however requests of different tenants share a batch."""

import asyncio
import dataclasses
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from agent.adapters import AdapterCache, attach
from agent.drafting import IncrementalText
from core.errors import Overloaded
from tests.agent.engines import engine_for, plain, prompts


def test_concurrent_requests_decode_as_generate_does(tiny_model):
    engine = engine_for(tiny_model)
    requests = list(zip(prompts(tiny_model.tokenizer, 6), [5, 17, 9, 30, 1, 12], strict=True))
    streams = [engine.submit(prompt, n, None) for prompt, n in requests]  # joined and left at different steps
    for (prompt, n), stream in zip(requests, streams, strict=True):
        assert stream.result(timeout=60) == plain(tiny_model.model, tiny_model.tokenizer, prompt, n)
        assert stream.finish_reason == "length"
    assert engine.steps < sum(n for _, n in requests)  # rows really shared decode steps


@pytest.mark.parametrize("whole_step", [True, False], ids=["whole-step", "by-parts"])
def test_mixed_adapters_in_one_batch_match_peft(tiny_model, tiny_base_dir, adapters, whole_step):
    """Decode steps as one call of the C kernel, or by parts (whichever the products measured
    fastest here would pick): PEFT's tokens either way."""
    engine = engine_for(tiny_model)
    engine.model.step_rows = sys.maxsize if whole_step else 0
    choices = [0, 1, 2, None, 1, 0, None, 2]  # three adapters and the bare base, interleaved
    requests = list(zip(prompts(tiny_model.tokenizer, 8), choices, [8, 14, 6, 11, 9, 14, 3, 10], strict=True))
    streams = [engine.submit(p, n, adapters[c] if c is not None else None) for p, c, n in requests]

    reference = LlamaForCausalLM.from_pretrained(tiny_base_dir).eval()  # PEFT modifies the model it wraps
    for (prompt, choice, n), stream in zip(requests, streams, strict=True):
        expected = plain(tiny_model.model, tiny_model.tokenizer, prompt, n)
        if choice is not None:
            reference = attach(reference, adapters[choice])
            with_adapter = plain(reference, tiny_model.tokenizer, prompt, n)
            assert with_adapter != expected  # the adapter matters
            expected = with_adapter
        assert stream.result(timeout=60) == expected, (choice, n)


def test_scaled_adapters_match_peft_at_the_same_scale(tiny_model, tiny_base_dir, adapters):
    """A scale multiplies each row's adapter update as PEFT's set_scale does, per row: in one batch,
    adapters at different scales, the same adapter at two scales, and the bare base."""
    engine = engine_for(tiny_model)
    choices = [(0, 0.5), (1, 1.5), (0, 1.5), None, (2, 0.5), (0, 1.0), (1, 0.75)]
    requests = list(zip(prompts(tiny_model.tokenizer, 7), choices, [12, 9, 14, 6, 11, 13, 10], strict=True))
    refs = [dataclasses.replace(adapters[c[0]], scale=c[1]) if c else None for c in choices]
    streams = [engine.submit(p, n, ref) for (p, _, n), ref in zip(requests, refs, strict=True)]
    results = [stream.result(timeout=60) for stream in streams]
    assert engine.adapters.loads == 6  # an adapter at another scale is loaded as other weights

    reference = LlamaForCausalLM.from_pretrained(tiny_base_dir).eval()  # PEFT modifies the model it wraps
    for (prompt, choice, n), ref, got in zip(requests, refs, results, strict=True):
        if ref is None:
            assert got == plain(tiny_model.model, tiny_model.tokenizer, prompt, n)
            continue
        reference = attach(reference, dataclasses.replace(ref, scale=1.0))
        unscaled = plain(reference, tiny_model.tokenizer, prompt, n)
        reference = attach(reference, ref)  # PEFT's LoraLayer.set_scale
        layer, name = reference.base_model.model.model.layers[0].self_attn.q_proj, f"adapter-{ref.id}"
        assert layer.scaling[name] == ref.scale * layer.lora_alpha[name] / layer.r[name]
        expected = plain(reference, tiny_model.tokenizer, prompt, n)
        assert ref.scale == 1.0 or expected != unscaled, choice  # the scale matters
        assert got == expected, choice


def test_the_embedded_model_decodes_as_generate_does(embedded_model, tokenizer):
    engine = engine_for(embedded_model, max_batch=2, max_length=1024)
    prompt = prompts(tokenizer, 1)[0]
    stream = engine.submit(prompt, 48, None)
    assert stream.result(timeout=120) == plain(embedded_model.model, tokenizer, prompt, 48)


def test_a_full_queue_refuses_with_a_retry_hint(tiny_model):
    engine = engine_for(tiny_model, max_batch=1, max_queue=1)
    prompt = prompts(tiny_model.tokenizer, 1)[0]
    running = engine.submit(prompt, 400, None)
    while running.first_token_at is None:  # admitted: the queue is empty again
        pass
    waiting = engine.submit(prompt, 4, None)
    with pytest.raises(Overloaded, match="queue is full") as refused:
        engine.submit(prompt, 4, None)
    assert refused.value.retry_after_s >= 1
    running.cancel()
    assert running.result(timeout=30) and running.finish_reason == "cancelled"
    assert len(waiting.result(timeout=30)) == 4  # the queued request still runs


def test_tokens_stream_to_an_event_loop(tiny_model):
    engine = engine_for(tiny_model)
    prompt = prompts(tiny_model.tokenizer, 1)[0]

    async def consume() -> list[int]:
        stream = engine.submit(prompt, 10, None)
        return [token async for token in stream]

    assert asyncio.run(consume()) == plain(tiny_model.model, tiny_model.tokenizer, prompt, 10)


def test_adapter_cache_evicts_the_least_recently_used(tiny_model, adapters):
    layers = tiny_model.model.config.num_hidden_layers
    layout = {"num_layers": layers, "device": torch.device("cpu"), "dtype": tiny_model.model.dtype}
    cache = AdapterCache(max_count=2, max_bytes=2**30, **layout)
    first = cache.get(adapters[0])
    cache.get(adapters[1])
    assert cache.get(adapters[0]) is first and cache.loads == 2  # cached: not loaded again
    cache.get(adapters[2])  # evicts adapters[1], the least recently used
    assert (1, 1.0) in cache and (2, 1.0) not in cache and (3, 1.0) in cache
    cache.get(adapters[1])
    assert cache.loads == 4 and (1, 1.0) not in cache  # loaded again on demand

    small = AdapterCache(max_count=10, max_bytes=first.nbytes, **layout)
    small.get(adapters[0])
    small.get(adapters[1])
    assert (1, 1.0) not in small and (2, 1.0) in small
    assert small.nbytes <= max(first.nbytes, small.get(adapters[1]).nbytes)


def test_incremental_text_never_splits_a_character(tokenizer):
    text = "Thanks, Zoë! Your wheel is ready 🚲 — collect any time."
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    incremental = IncrementalText(tokenizer)
    deltas = [incremental.delta(tokens[: i + 1]) for i in range(len(tokens))]
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)
