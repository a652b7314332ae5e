import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import agent.drafting as drafting
from agent.drafting import Drafter, get_drafter
from agent.prompt import BODY_TRUNCATED_MARK, IncomingEmail, build_messages, fit_messages, prompt_token_ids
from core.errors import Invalid, RateLimited
from core.settings import Settings


def settings(tmp_path, **overrides) -> Settings:
    values = {"max_new_tokens": 8, "max_new_tokens_limit": 32, "max_prompt_tokens": 256} | overrides
    return Settings(var_dir=tmp_path, model_cache_dir=tmp_path / "models", **values)


def email(body: str = "Can I change the delivery address for order 1182?") -> IncomingEmail:
    return IncomingEmail(sender="carol@example.com", subject="Order 1182", body=body)


def test_draft_returns_text_and_token_counts(tiny_model, tmp_path):
    result = Drafter.local(tiny_model, settings(tmp_path)).draft("Be brief.", email())
    messages = build_messages("Be brief.", email(), quoted_history_chars=2000)
    assert result.prompt_tokens == len(prompt_token_ids(tiny_model.tokenizer, messages))
    assert result.tokens_generated == 8  # settings.max_new_tokens
    assert result.finish_reason == "length"
    assert result.text and result.text == result.text.strip()
    assert "<|im_end|>" not in result.text
    assert result.latency_ms > 0


def test_max_new_tokens_is_bounded_by_the_limit(tiny_model, tmp_path):
    drafter = Drafter.local(tiny_model, settings(tmp_path))
    assert drafter.draft("", email(), max_new_tokens=3).tokens_generated == 3
    assert drafter.draft("", email(), max_new_tokens=32).tokens_generated == 32
    for bad in (33, 0):
        with pytest.raises(ValueError, match=f"max_new_tokens is {bad}; it must be at least 1 and the limit is 32"):
            drafter.draft("", email(), max_new_tokens=bad)


def test_long_email_is_cut_to_max_prompt_tokens(tiny_model, tmp_path):
    tokenizer = tiny_model.tokenizer
    long_body = "Please read all of this carefully. " * 2000
    drafter = Drafter.local(tiny_model, settings(tmp_path, max_prompt_tokens=200))
    result = drafter.draft("Sign as Bob.", email(long_body))
    assert 190 <= result.prompt_tokens <= 200

    messages = build_messages("Sign as Bob.", email(long_body), quoted_history_chars=2000)
    fitted = fit_messages(tokenizer, messages, 200)
    assert fitted[0] == messages[0]  # the system message is never cut
    assert fitted[1]["content"].startswith("From: carol@example.com\nSubject: Order 1182\n\nPlease read")
    assert fitted[1]["content"].endswith(BODY_TRUNCATED_MARK)
    ids = prompt_token_ids(tokenizer, fitted)
    assert len(ids) == result.prompt_tokens
    tail = tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert ids[-len(tail) :] == tail


def test_instructions_longer_than_the_prompt_budget_are_refused(tiny_model, tmp_path):
    drafter = Drafter.local(tiny_model, settings(tmp_path, max_prompt_tokens=64))
    with pytest.raises(Invalid, match="leave no room for the email within the prompt budget of 64 tokens"):
        drafter.draft("Always be polite. " * 50, email())


def test_concurrent_drafts_match_sequential_ones(tiny_model, tmp_path):
    drafter = Drafter.local(tiny_model, settings(tmp_path, max_new_tokens=12))
    emails = [
        email(f"Question {i}: when does order {1000 + 37 * i} ship to {city}?")
        for i, city in enumerate(["Oslo", "Lima", "Pune", "Kyiv", "Accra", "Perth"])
    ]
    sequential = [drafter.draft("Be brief.", e).text for e in emails]
    assert len(set(sequential)) > 1  # otherwise a mix-up between threads could not show

    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(lambda e: drafter.draft("Be brief.", e).text, emails * 3))
    assert concurrent == sequential * 3


def test_get_drafter_loads_the_model_once(tiny_model, tmp_path, monkeypatch):
    loads = []

    def slow_load(_settings):
        loads.append(1)
        time.sleep(0.2)
        return tiny_model

    monkeypatch.setattr(drafting, "load_base_model", slow_load)
    monkeypatch.setattr(drafting, "_drafter", None)
    start = threading.Barrier(4)

    def call():
        start.wait()
        return get_drafter(settings(tmp_path))

    with ThreadPoolExecutor(max_workers=4) as pool:
        drafters = [f.result() for f in [pool.submit(call) for _ in range(4)]]
    assert len(loads) == 1
    assert all(d is drafters[0] for d in drafters)
    assert drafters[0].model_id == tiny_model.model_id
    assert get_drafter() is drafters[0]


def test_one_tenant_cannot_take_the_whole_drafting_queue(tiny_model, tmp_path):
    """max_batch 2 + max_queue 2 at a share of 0.5: two drafts per tenant, then 429 for that
    tenant only, and its share comes back as its drafts end (also when cancelled)."""
    limits = {"max_batch": 2, "max_queue": 2, "tenant_draft_share": 0.5, "max_new_tokens_limit": 1000}
    drafter = Drafter.local(tiny_model, settings(tmp_path, **limits))
    prompt = drafter.prompt("", email())
    busy = drafter.submit_many([prompt, prompt], max_new_tokens=1000, tenant_id=1)
    while any(stream.first_token_at is None for stream in busy):  # both decoding: the queue is empty
        time.sleep(0.001)
    with pytest.raises(RateLimited, match="share of the drafting queue is 2") as refused:
        drafter.submit(prompt, max_new_tokens=4, tenant_id=1)
    assert refused.value.retry_after_s >= 1 and drafter.in_flight(1) == 2
    other = drafter.submit(prompt, max_new_tokens=4, tenant_id=2)  # another tenant is still served
    assert len(other.result(30)) == 4
    for stream in busy:  # a cancelled draft gives its place back, as a finished one does
        stream.cancel()
        stream.result(30)
    assert drafter.in_flight(1) == drafter.in_flight(2) == 0
    assert len(drafter.submit(prompt, max_new_tokens=4, tenant_id=1).result(30)) == 4
    drafter.close()
