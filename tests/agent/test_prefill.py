"""Prefill of several prompts packed into one forward: the same logits and the same KV cache as
prefilling them one by one, whatever their lengths and adapters, and the engine's packs: the same
drafts as requests admitted alone, with a failed or cancelled request finishing alone."""

import time
from pathlib import Path

import pytest
import torch

from agent import engine as engine_module
from agent.adapters import AdapterRef, LoraWeights, SegmentLora, pack_lora
from agent.kv_cache import KVCache
from agent.llama import Llama
from agent.repetition import RepetitionGuard
from tests.agent.engines import engine_for, plain, prompts

# Prompts of different lengths, and their adapters (indices into the `adapters` fixture): two
# runs of one adapter, prompts without one between them, and another adapter.
CHOICES = [0, 0, None, 1, None, 2]


def _prompts(tokenizer) -> list[list[int]]:
    full = prompts(tokenizer, 4)
    return [full[0], full[1][:7], full[2], full[3], full[0][:1], full[1]]


@torch.inference_mode()
def _prefilled(tiny_model, adapters, packed: bool) -> tuple[torch.Tensor, KVCache]:
    """The logits after each of the prompts [prompts, vocab], and the cache they filled (prompt
    i in slot i), packed into one forward or one forward each."""
    llama = Llama(tiny_model.model, max_length=512)
    cache = KVCache(llama, max_batch=len(CHOICES), max_length=512)
    layout = (llama.num_layers, llama.device, llama.dtype)
    weights = [LoraWeights.load(adapters[c], *layout) if c is not None else None for c in CHOICES]
    tokens = [torch.tensor(prompt) for prompt in _prompts(tiny_model.tokenizer)]
    lengths = [len(t) for t in tokens]
    if packed:
        lora = pack_lora(weights, lengths)
        assert isinstance(lora, SegmentLora) and len(lora.runs) == 3  # the first two prompts are one run
        logits = llama.prefill(tokens, lora, cache.prefill_attention(list(range(len(tokens))), lengths))
    else:
        logits = torch.cat(
            [
                llama.prefill([t], w, cache.prefill_attention([slot], [len(t)]))
                for slot, (t, w) in enumerate(zip(tokens, weights, strict=True))
            ]
        )
    return logits, cache


def test_packed_prefill_gives_each_prompt_its_own_logits(tiny_model, adapters):
    alone, _ = _prefilled(tiny_model, adapters, packed=False)
    packed, _ = _prefilled(tiny_model, adapters, packed=True)
    assert packed.shape == (len(CHOICES), tiny_model.model.config.vocab_size)
    assert torch.allclose(packed, alone, rtol=1e-5, atol=1e-5), (packed - alone).abs().max()

    with torch.inference_mode():  # anchored on the Hugging Face forward, for a prompt without an adapter
        prompt = _prompts(tiny_model.tokenizer)[2]
        reference = tiny_model.model(torch.tensor([prompt])).logits[0, -1]
    assert torch.allclose(alone[2], reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(alone[0], alone[3], rtol=1e-3, atol=1e-3)  # the prompts differ


def test_packed_prefill_fills_the_cache_as_one_by_one(tiny_model, adapters):
    """The cached keys are rotated by their positions: had the positions run on across the pack
    rather than restart at each prompt, the logits would not tell (RoPE's scores depend on
    relative positions only), but these keys would differ, and so would every later step."""
    _, alone = _prefilled(tiny_model, adapters, packed=False)
    _, packed = _prefilled(tiny_model, adapters, packed=True)
    for layer, (k, v) in enumerate(zip(alone.k, alone.v, strict=True)):  # whole tensors: nothing else written
        assert torch.allclose(packed.k[layer], k, rtol=1e-5, atol=1e-5), layer
        assert torch.allclose(packed.v[layer], v, rtol=1e-5, atol=1e-5), layer
    lengths = [len(p) for p in _prompts(tiny_model.tokenizer)]
    assert all(alone.k[0][slot, :, : lengths[slot]].abs().sum() > 0 for slot in range(len(CHOICES)))


def test_a_pack_with_one_adapter_uses_its_weights(tiny_model, adapters):
    model = tiny_model.model
    weights = LoraWeights.load(adapters[0], model.config.num_hidden_layers, model.device, model.dtype)
    assert pack_lora([weights, weights], [5, 9]) is weights
    assert pack_lora([None, None], [5, 9]) is None
    assert pack_lora([None, weights], [5, 9]).runs == [(5, 14, weights)]


def _requests(tiny_model, adapters):
    """Prompts, adapters, lengths and guards of different requests: tenants mixed, one with
    logits penalties."""
    choices = [None, 0, 1, 0, None, 2]
    lengths = [7, 12, 5, 9, 14, 3]
    guards = [RepetitionGuard(), RepetitionGuard(repetition_penalty=1.3)] + [RepetitionGuard()] * 4
    refs = [adapters[c] if c is not None else None for c in choices]
    return list(zip(prompts(tiny_model.tokenizer, 6), refs, lengths, guards, strict=True))


def test_requests_packed_together_decode_as_requests_admitted_alone(tiny_model, adapters):
    requests = _requests(tiny_model, adapters)
    alone = engine_for(tiny_model)
    expected = [alone.submit(p, n, ref, guard).result(timeout=60) for p, ref, n, guard in requests]
    assert alone.prefills == alone.prefilled == len(requests)

    # The batch window waits for every request (max_batch of them), so they are admitted together.
    together = engine_for(tiny_model, max_batch=len(requests), batch_window_s=30)
    streams = [together.submit(p, n, ref, guard) for p, ref, n, guard in requests]
    assert [stream.result(timeout=60) for stream in streams] == expected
    assert together.prefilled == len(requests) and together.prefills < together.prefilled
    alone.close()
    together.close()


def test_a_pack_keeps_to_its_token_budget(tiny_model, monkeypatch):
    """A pack takes the waiting requests in order while their prompts fit the budget; a prompt
    longer than the budget is prefilled alone."""
    short = prompts(tiny_model.tokenizer, 2)
    monkeypatch.setattr(engine_module, "PREFILL_PACK_TOKENS", len(short[0]) + len(short[1]))
    requests = [short[0] + short[1] + short[0], *short, short[0]]  # packs: the long one, the next two, the last
    engine = engine_for(tiny_model, max_batch=len(requests), batch_window_s=30)
    streams = [engine.submit(prompt, 3, None) for prompt in requests]
    assert all(len(stream.result(timeout=60)) == 3 for stream in streams)
    assert (engine.prefills, engine.prefilled) == (3, 4)
    engine.close()


def test_an_adapter_that_fails_to_load_fails_its_request_alone(tiny_model, tmp_path: Path):
    tokens = prompts(tiny_model.tokenizer, 3)
    missing = AdapterRef(99, tmp_path / "missing")  # no adapter_config.json there
    engine = engine_for(tiny_model, max_batch=3, batch_window_s=30)
    streams = [engine.submit(p, 6, ref) for p, ref in zip(tokens, [None, missing, None], strict=True)]
    with pytest.raises(FileNotFoundError):
        streams[1].result(timeout=60)
    assert streams[1].finish_reason == "error"
    for prompt, stream in zip(tokens[::2], streams[::2], strict=True):
        assert stream.result(timeout=60) == plain(tiny_model.model, tiny_model.tokenizer, prompt, 6)
    assert (engine.prefills, engine.prefilled) == (1, 2)
    engine.close()


def test_a_request_cancelled_while_waiting_is_not_prefilled(tiny_model):
    tokens = prompts(tiny_model.tokenizer, 3)
    engine = engine_for(tiny_model, max_batch=3, batch_window_s=30)
    first = engine.submit(tokens[0], 4, None)
    cancelled = engine.submit(tokens[1], 4, None)
    cancelled.cancel()  # before the third request ends the batch window
    last = engine.submit(tokens[2], 4, None)
    assert cancelled.result(timeout=60) == [] and cancelled.finish_reason == "cancelled"
    assert len(first.result(timeout=60)) == len(last.result(timeout=60)) == 4
    assert (engine.prefills, engine.prefilled) == (1, 2)
    engine.close()


def test_closing_ends_the_batch_window(tiny_model):
    engine = engine_for(tiny_model, batch_window_s=60)
    stream = engine.submit(prompts(tiny_model.tokenizer, 1)[0], 3, None)
    started = time.perf_counter()
    engine.close()  # the worker is in its batch window, waiting for more requests
    assert time.perf_counter() - started < 30
    assert len(stream.result(timeout=0)) == 3
