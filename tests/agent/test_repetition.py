"""The repetition guard: the engine's tokens equal `generate`'s with the same logits processors,
per row in mixed batches, and a draft that falls into a cycle stops after the cycle's first copy."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

from agent.adapters import attach
from agent.engine import PLAIN_GREEDY
from agent.prompt import stop_token_ids
from agent.repetition import RepetitionGuard, cycle_start
from tests.agent.engines import engine_for, prompts


def generate(model, tokenizer, prompt: list[int], max_new_tokens: int, **processors) -> list[int]:
    stops = stop_token_ids(model.generation_config, tokenizer)
    output = model.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=stops[0],
        **processors,
    )[0, len(prompt) :].tolist()
    end = next((i + 1 for i, token in enumerate(output) if token in stops), len(output))
    return output[:end]


def test_cycle_start_finds_the_first_copy_of_a_repeated_block():
    assert cycle_start([9, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]) == 5  # 3 copies of 4 tokens: keep one
    assert cycle_start([9, 1, 2, 3, 4, 1, 2, 3, 4]) is None  # two copies are not yet a cycle
    assert cycle_start([5, 7, 7, 7]) is None  # "no, no, no": too short to be a loop
    assert cycle_start([5] + [7] * 12) == 2  # one token repeated, as long as a loop must be
    assert cycle_start([1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4]) is None  # near copies are not a cycle
    assert cycle_start([1, 2, 3] * 4) == 3


@pytest.mark.parametrize(
    "processors",
    [{"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}, {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3}],
)
def test_guarded_rows_decode_as_generate_does_beside_unguarded_rows(tiny_model, tiny_base_dir, adapters, processors):
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    engine = engine_for(tiny_model)
    guard = RepetitionGuard(**processors)
    requests = list(zip(prompts(tokenizer, 6), [None, 0, None, 2, 1, None], [guard, guard, None] * 2, strict=True))
    streams = [
        engine.submit(prompt, 24, adapters[a] if a is not None else None, g or PLAIN_GREEDY)
        for prompt, a, g in requests
    ]
    reference = LlamaForCausalLM.from_pretrained(tiny_base_dir).eval()  # PEFT modifies the model it wraps
    changed = 0
    for (prompt, choice, g), stream in zip(requests, streams, strict=True):
        if choice is not None:
            reference = attach(reference, adapters[choice])
        decoder = model if choice is None else reference
        expected = generate(decoder, tokenizer, prompt, 24, **(processors if g else {}))
        assert stream.result(timeout=60) == expected, (choice, g)
        changed += g is not None and expected != generate(decoder, tokenizer, prompt, 24)
    assert changed  # the processors changed some drafts


def test_openai_penalties_follow_their_definition(tiny_model):
    """frequency and presence penalties over the draft's own tokens, as OpenAI defines them."""
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    prompt = prompts(tokenizer, 1)[0]
    guard = RepetitionGuard(frequency_penalty=0.7, presence_penalty=0.5)
    stream = engine_for(tiny_model).submit(prompt, 20, None, guard)
    ids, counts = list(prompt), torch.zeros(model.config.vocab_size)
    with torch.inference_mode():
        for _ in range(20):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            logits -= counts * 0.7 + (counts > 0) * 0.5
            token = int(logits.argmax())
            ids.append(token)
            counts[token] += 1
    assert stream.result(timeout=60) == ids[len(prompt) :]


def looping_model(base_dir, cycle: list[int]) -> LlamaForCausalLM:
    """The tiny Llama rewired so that greedy decoding repeats `cycle` forever: the blocks add
    nothing to the residual stream, so each next token depends on the last token alone."""
    model = LlamaForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        head.zero_()
        embed[:, len(cycle)] = 1.0  # any other token leads into the cycle
        head[cycle[0], len(cycle)] = 10.0
        for i, token in enumerate(cycle):
            embed[token] = 0.0
            embed[token, i] = 1.0
            head[cycle[(i + 1) % len(cycle)], i] = 10.0
    return model


def test_a_looping_model_s_draft_stops_after_the_first_copy_of_its_cycle(tiny_model, tiny_base_dir):
    tokenizer = tiny_model.tokenizer
    cycle = tokenizer("Hello,\n\n", add_special_tokens=False).input_ids
    model = looping_model(tiny_base_dir, cycle)
    prompt = prompts(tokenizer, 1)[0]
    unguarded = generate(model, tokenizer, prompt, 120)
    assert len(unguarded) == 120 and unguarded[:6] == cycle * 2  # without the guard: loops to the limit
    engine = engine_for(SimpleNamespace(model=model, tokenizer=tokenizer))
    stream = engine.submit(prompt, 120, None, RepetitionGuard(stop_cycles=True))
    assert stream.result(timeout=60) == cycle
    assert stream.finish_reason == "repetition"
    assert tokenizer.decode(stream.tokens) == "Hello,\n\n"


def test_guard_settings_out_of_range_are_refused():
    with pytest.raises(ValueError, match="repetition_penalty must be between 1 and 2"):
        RepetitionGuard(repetition_penalty=0.5)
