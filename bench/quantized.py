"""What holding the serving engine's base weights at 8 or 4 bits does to the drafts, on the sample
tenant (the embedded model in float32, the base model: the formats change the base weights only,
a LoRA update is applied in float in every format):

- held-out NLL: mean token NLL of the reviewers' replies given their prompts, over every fifth of
  the sample tenant's 300 emails (60), as the engine drafts in each format (the prompt
  prefilled, the reply fed one decode step a token: prefills multiply by the float weights);
- greedy-draft agreement with the float engine: the same 60 emails drafted with the server's
  repetition guard, up to 128 new tokens; the share drafted token for token the same, and the mean
  share of each float draft's tokens before the first difference.

Run: .venv/bin/python -m bench.quantized   (about 10 minutes on 2 CPU cores)
"""

import statistics

import torch

from agent.base_model import load_base_model
from agent.drafting import Drafter
from agent.kv_cache import KVCache
from agent.llama import Llama
from agent.prompt import IncomingEmail, end_of_turn_id
from agent.threads import in_fresh_thread
from bench.report import save
from core.settings import Settings
from feedback.samples import load_sample_tenant

NEW_TOKENS = 128
FORMATS = ("float", "int8", "int4")


@torch.inference_mode()
def mean_nll(model: Llama, rows: list[tuple[list[int], list[int]]]) -> float:
    """Mean token NLL of each completion given its prompt, averaged over the rows, scored as the
    engine drafts: the prompt prefilled, then the completion's tokens fed one decode step each
    (a prefill multiplies by the float weights, a decode step by the format's own)."""
    cache = KVCache(model, 1, max(len(p) + len(c) for p, c in rows))
    scores = []
    for prompt, completion in rows:
        logits = [model.prefill([torch.tensor(prompt)], None, cache.prefill_attention([0], [len(prompt)]))]
        for offset, token in enumerate(completion[:-1]):
            position = torch.tensor([len(prompt) + offset])
            attend = cache.decode_attention(position, span=len(prompt) + offset + 1)
            logits.append(model.decode(torch.tensor([token]), None, attend))
        predicted = torch.cat(logits).float().log_softmax(-1)
        scores.append(-predicted.gather(1, torch.tensor(completion)[:, None]).mean().item())
    return statistics.mean(scores)


def agreement(drafts: list[list[int]], reference: list[list[int]]) -> dict:
    same_prefix = []
    for ours, theirs in zip(drafts, reference, strict=True):
        n = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
        same_prefix.append(n / max(len(theirs), 1) if ours != theirs else 1.0)
    return {
        "identical_drafts": round(sum(a == b for a, b in zip(drafts, reference, strict=True)) / len(drafts), 3),
        "mean_share_before_first_difference": round(statistics.mean(same_prefix), 3),
    }


def main() -> None:
    sample = load_sample_tenant()
    emails = sample.emails[::5]
    settings = Settings(model_dtype="float32")
    loaded = in_fresh_thread(load_base_model, settings)
    end = end_of_turn_id(loaded.tokenizer)
    figures: dict = {"emails": len(emails), "new_tokens": NEW_TOKENS, "dtype": "float32"}
    drafts: dict[str, list[list[int]]] = {}
    for weights in FORMATS:
        drafter = in_fresh_thread(Drafter.local, loaded, settings.model_copy(update={"serving_weights": weights}))
        prompts = [drafter.prompt(sample.instructions, IncomingEmail(e.sender, e.subject, e.body)) for e in emails]
        replies = [loaded.tokenizer(e.reply, add_special_tokens=False).input_ids + [end] for e in emails]
        nll = in_fresh_thread(mean_nll, drafter.backend.model, list(zip(prompts, replies, strict=True)))
        drafts[weights] = [stream.result() for stream in drafter.submit_many(prompts, max_new_tokens=NEW_TOKENS)]
        drafter.close()
        figures[weights] = {"heldout_nll": round(nll, 4)}
        if weights != "float":
            figures[weights] |= agreement(drafts[weights], drafts["float"])
            figures[weights]["nll_vs_float"] = f"{nll / figures['float']['heldout_nll'] - 1:+.2%}"
        print(weights, figures[weights], flush=True)
    save("quantized", figures)


if __name__ == "__main__":
    main()
