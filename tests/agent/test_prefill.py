"""Prefill of several prompts packed into one forward: the same logits and the same KV cache as
prefilling them one by one, whatever their lengths and adapters."""

import torch

from agent.adapters import LoraWeights, SegmentLora, pack_lora
from agent.kv_cache import KVCache
from agent.llama import Llama
from tests.agent.engines import prompts

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
    weights = [
        LoraWeights.load(adapters[c], llama.num_layers, llama.dtype, llama.device) if c is not None else None
        for c in CHOICES
    ]
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
    weights = LoraWeights.load(adapters[0], model.config.num_hidden_layers, model.dtype, model.device)
    assert pack_lora([weights, weights], [5, 9]) is weights
    assert pack_lora([None, None], [5, 9]) is None
    assert pack_lora([None, weights], [5, 9]).runs == [(5, 14, weights)]
