"""Drafting latency of a 128-token reply with the embedded base model, bf16 and fp32, single stream.

Run: .venv/bin/python -m bench.draft_latency
"""

import statistics
import time

from agent.drafting import Drafter
from agent.model import load_base_model
from agent.prompt import IncomingEmail
from bench.report import save
from core.settings import Settings
from feedback.samples import load_sample_tenant

RUNS = 5
NEW_TOKENS = 128


def main() -> None:
    sample = load_sample_tenant()
    email = sample.emails[1]
    incoming = IncomingEmail(email.sender, email.subject, email.body)
    figures = {}
    for dtype in ("bfloat16", "float32"):
        settings = Settings(model_dtype=dtype)
        started = time.perf_counter()
        drafter = Drafter(load_base_model(settings), settings)
        load_s = time.perf_counter() - started
        drafter.draft(sample.instructions, incoming, max_new_tokens=16)  # warm-up
        # min_new_tokens is not used: a draft that stops early is reported as such.
        runs = [drafter.draft(sample.instructions, incoming, max_new_tokens=NEW_TOKENS) for _ in range(RUNS)]
        latencies = [run.latency_ms for run in runs]
        tokens = statistics.median(run.tokens_generated for run in runs)
        median = statistics.median(latencies)
        figures[dtype] = {
            "load_s": round(load_s, 2),
            "prompt_tokens": runs[0].prompt_tokens,
            "tokens_generated": tokens,
            "latency_ms_median": round(median),
            "latency_ms_min": round(min(latencies)),
            "latency_ms_max": round(max(latencies)),
            "tokens_per_s": round(tokens / median * 1000, 1),
        }
    save("draft_latency", figures)


if __name__ == "__main__":
    main()
