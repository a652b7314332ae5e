"""Engines on a test's model, and prompts for them to decode."""

from agent.adapters import AdapterCache
from agent.drafting import generate_greedy
from agent.engine import Engine
from agent.prompt import IncomingEmail, build_messages, pad_token_id, prompt_token_ids, stop_token_ids
from agent.weights import adapter_kernel_dtype, compute_dtype


def prompts(tokenizer, count: int) -> list[list[int]]:
    bodies = ["Where is order 1182?", "Can I return a helmet after 40 days?", "Thanks!", "My brakes squeal " * 5]
    return [
        prompt_token_ids(
            tokenizer, build_messages("Be brief.", IncomingEmail("a@example.com", "Hi", body), quoted_history_chars=500)
        )
        for body in (bodies * count)[:count]
    ]


def plain(model, tokenizer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens of `model` (a PeftModel too) as transformers' generate decodes them."""
    stops = stop_token_ids(model.generation_config, tokenizer)
    return generate_greedy(
        model, [prompt], max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=pad_token_id(tokenizer)
    )[0]


def engine_for(loaded, kernel_dtype=None, **overrides) -> Engine:
    """An engine over the loaded model, its adapters read by the LoRA kernel in `kernel_dtype` (by
    default the one the service would choose)."""
    options = {"max_batch": 8, "max_queue": 16, "max_length": 512} | overrides
    model = loaded.model
    layout = {"num_layers": model.config.num_hidden_layers, "device": model.device}
    weights = options.get("weights", "float")
    kernel_dtype = kernel_dtype or adapter_kernel_dtype(model.dtype, weights)
    dtypes = {"dtype": compute_dtype(model.dtype, weights), "kernel_dtype": kernel_dtype}
    cache = AdapterCache(4, 2**30, **layout, **dtypes)
    return Engine(model, stop_ids=stop_token_ids(model.generation_config, loaded.tokenizer), adapters=cache, **options)
