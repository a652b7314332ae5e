"""An OpenAI-compatible chat completions endpoint, so OpenAI SDK clients can draft with a tenant's
adapters: `model` is `base`, `champion` or `v<N>` (an adapter version of the key's tenant).
Greedy decoding only, with OpenAI's frequency and presence penalties and vLLM's
repetition_penalty; a draft the repetition guard stopped finishes with "stop". Each answer (and
each chunk) says the adapter scale it was decoded with (`adapter_scale`, null for the base).
Completions are answered, not stored: drafts for review go through /v1/drafts."""

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from agent.adapters import AdapterRef
from agent.drafting import Drafter, IncrementalText
from agent.prompt import prompt_token_ids
from api import disconnect
from api.deps import AgentKey, DrafterDep, SessionDep, SettingsDep
from api.openai_schemas import ChatCompletion, ChatCompletionRequest, ModelList
from core.errors import Invalid, NotFound, TooLarge
from core.settings import Settings
from feedback.models import ApiKey
from training import registry

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
PATHS = ("/v1/models", "/v1/chat/completions")  # errors here take OpenAI's shape


def _adapter(model: str, key: ApiKey, session, drafter: Drafter, settings: Settings) -> AdapterRef | None:
    """The adapter a model name (base, champion or v<N>, as the request schema checks) stands for."""
    if model == "base":
        return None
    if model == "champion":
        if (champion := registry.champion_ref(session, settings, key.tenant_id, drafter.fingerprint)) is None:
            raise NotFound("this tenant has no champion adapter yet; use model 'base'")
        return champion
    adapter = registry.get_adapter(session, key.tenant_id, version=int(model.removeprefix("v")))
    return registry.serving_ref(session, settings, adapter, drafter.fingerprint)


def _prepare(request: ChatCompletionRequest, key: ApiKey, session, drafter: Drafter, settings: Settings):
    """The prompt ids, the adapter and the token budget of a request, or a clear error."""
    if request.temperature not in (None, 0) or (request.n or 1) != 1:
        raise Invalid("draftloop decodes greedily: send temperature 0 (or none) and n 1 (or none)")
    max_new_tokens = settings.reply_length(request.max_completion_tokens or request.max_tokens, "max_tokens")
    messages = [{"role": m.role, "content": m.text} for m in request.messages]
    if messages[0]["role"] != "system":  # the tenant's instructions, unless the client sends its own
        messages.insert(0, {"role": "system", "content": key.tenant.instructions})
    prompt = prompt_token_ids(drafter.tokenizer, messages)
    if len(prompt) > settings.max_prompt_tokens:
        raise TooLarge(f"the messages are {len(prompt)} tokens; the limit is {settings.max_prompt_tokens}")
    adapter = _adapter(request.model, key, session, drafter, settings)
    session.commit()  # nothing is held while the model works (see drafts._draft_and_store)
    guard = drafter.guard_with(
        frequency_penalty=request.frequency_penalty,
        presence_penalty=request.presence_penalty,
        repetition_penalty=request.repetition_penalty,
    )
    return prompt, adapter, max_new_tokens, guard


def _finish_reason(reason: str) -> str:
    return "stop" if reason == "repetition" else reason  # OpenAI's values


@router.get("/models", response_model=ModelList, summary="The models this key can draft with")
def list_models(key: AgentKey, session: SessionDep):
    versions = [f"v{a.version}" for a in registry.list_adapters(session, key.tenant_id)]
    has_champion = registry.drafting_adapter(session, key.tenant_id) is not None
    ids = ["base", *(["champion"] if has_champion else []), *versions]
    return ModelList(data=[{"id": name, "owned_by": key.tenant.slug} for name in ids])


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    summary="Chat completions (OpenAI-compatible)",
    responses={200: {"content": {"text/event-stream": {}}, "description": "With stream: true, chunks as SSE"}},
)
async def chat_completions(
    http: Request,
    request: ChatCompletionRequest,
    key: AgentKey,
    session: SessionDep,
    drafter: DrafterDep,
    settings: SettingsDep,
):
    prompt, adapter, max_new_tokens, guard = await run_in_threadpool(_prepare, request, key, session, drafter, settings)
    stream = drafter.submit(
        prompt, max_new_tokens=max_new_tokens, adapter=adapter, guard=guard, tenant_id=key.tenant_id
    )
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    scale = adapter.scale if adapter else None
    if request.stream:
        await stream.started()  # errors before the first token are answered as errors, not as a stream
    else:
        await disconnect.finished(http, [stream])
        result = drafter.result(prompt, stream)
        return ChatCompletion(
            id=completion_id,
            created=created,
            model=request.model,
            adapter_scale=scale,
            choices=[
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": _finish_reason(result.finish_reason),
                }
            ],
            usage={
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.tokens_generated,
                "total_tokens": result.prompt_tokens + result.tokens_generated,
            },
        )

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": request.model,
            "adapter_scale": scale,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return f"data: {json.dumps(body)}\n\n"

    async def events():
        text = IncrementalText(drafter.tokenizer)
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for _ in stream:
                if delta := text.delta(stream.tokens):
                    yield chunk({"content": delta})
            yield chunk({}, _finish_reason(stream.finish_reason))
            yield "data: [DONE]\n\n"
        finally:
            stream.cancel()  # the client left: stop decoding (a no-op once the stream has ended)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
