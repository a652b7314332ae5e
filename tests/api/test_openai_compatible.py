"""The OpenAI-compatible endpoint, driven by the official `openai` client."""

import openai
import pytest
from openai import OpenAI

from agent.prompt import prompt_token_ids
from core.settings import get_settings
from tests.factories import random_lora, store_version
from training import registry

QUESTION = "Can I bring my bike in for a service on Saturday?"


@pytest.fixture
def sdk(client, keys) -> OpenAI:
    """The official client, talking to the test app through its transport."""
    return OpenAI(base_url="http://testserver/v1", api_key=keys.agent["X-API-Key"], http_client=client, max_retries=0)


def expected(drafter_, instructions: str, max_new_tokens: int, adapter=None) -> str:
    messages = [{"role": "system", "content": instructions}, {"role": "user", "content": QUESTION}]
    prompt = prompt_token_ids(drafter_.tokenizer, messages)
    return drafter_.result(prompt, drafter_.submit(prompt, max_new_tokens=max_new_tokens, adapter=adapter)).text


def test_chat_completions_with_the_base_model(sdk, keys, tiny_drafter):
    messages = [{"role": "user", "content": QUESTION}]
    completion = sdk.chat.completions.create(model="base", messages=messages, max_tokens=12)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content == expected(tiny_drafter, keys.tenant.instructions, 12)  # the tenant's instructions
    assert completion.usage.completion_tokens == 12 and completion.model == "base"


def test_streamed_chunks_add_up_to_the_completion(sdk):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    whole = sdk.chat.completions.create(model="base", messages=messages, max_tokens=20).choices[0].message.content
    chunks = list(sdk.chat.completions.create(model="base", messages=messages, max_tokens=20, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_model_names_an_adapter_version_of_the_tenant(sdk, client, keys, session, tiny_drafter, tiny_model, tmp_path):
    settings = get_settings().model_copy(update={"adapter_dir": tmp_path / "registry"})
    client.app.dependency_overrides[get_settings] = lambda: settings
    folder = random_lora(tiny_model.model.config, tmp_path / "trained", seed=7)
    adapter = store_version(session, settings, keys.tenant.id, folder, base_fingerprint=tiny_drafter.fingerprint)
    session.commit()
    assert [m.id for m in sdk.models.list()] == ["base", "v1"]

    messages = [{"role": "user", "content": QUESTION}]
    with_adapter = sdk.chat.completions.create(model="v1", messages=messages, max_tokens=12).choices[0].message.content
    ref = registry.serving_ref(session, settings, adapter, tiny_drafter.fingerprint)
    assert with_adapter == expected(tiny_drafter, keys.tenant.instructions, 12, adapter=ref)
    assert with_adapter != expected(tiny_drafter, keys.tenant.instructions, 12)

    with pytest.raises(openai.NotFoundError, match="no champion"):
        sdk.chat.completions.create(model="champion", messages=messages)
    with pytest.raises(openai.NotFoundError, match="no adapter version 9"):
        sdk.chat.completions.create(model="v9", messages=messages)
    with pytest.raises(openai.UnprocessableEntityError) as ill_formed:
        sdk.chat.completions.create(model="gpt-4o", messages=messages)
    assert "base|champion|v" in str(ill_formed.value.body)


def test_bad_requests_say_what_to_fix(sdk, client, keys):
    messages = [{"role": "user", "content": QUESTION}]
    with pytest.raises(openai.UnprocessableEntityError, match="greedily"):
        sdk.chat.completions.create(model="base", messages=messages, temperature=0.7)
    with pytest.raises(openai.UnprocessableEntityError, match="limit"):
        sdk.chat.completions.create(model="base", messages=messages, max_tokens=10**6)
    reviewer = OpenAI(base_url="http://testserver/v1", api_key=keys.reviewer["X-API-Key"], http_client=client)
    with pytest.raises(openai.PermissionDeniedError):
        reviewer.chat.completions.create(model="base", messages=messages)
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url="http://testserver/v1", api_key="dl_wrong", http_client=client).models.list()


def test_openai_penalties_reach_the_engine(sdk, keys, tiny_drafter):
    messages = [{"role": "user", "content": QUESTION}]
    penalised = sdk.chat.completions.create(
        model="base", messages=messages, max_tokens=24, presence_penalty=-2.0, frequency_penalty=-1.0
    )
    prompt = prompt_token_ids(
        tiny_drafter.tokenizer, [{"role": "system", "content": keys.tenant.instructions}, *messages]
    )
    guard = tiny_drafter.guard_with(presence_penalty=-2.0, frequency_penalty=-1.0)  # rewards repeats
    stream = tiny_drafter.submit(prompt, max_new_tokens=24, guard=guard)
    assert penalised.choices[0].message.content == tiny_drafter.result(prompt, stream).text
    assert penalised.choices[0].message.content != expected(tiny_drafter, keys.tenant.instructions, 24)
