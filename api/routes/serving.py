"""The drafting server's side of the remote backend: `POST /v1/completions` with token ids, the
subset of vLLM's protocol that agent/remote.py speaks, so that one draftloop process with the
model's weights drafts for others (front servers that hold only the tokenizer).

`model` is `base` or an adapter's served name (training/registry.served_name), looked up in the
shared registry and verified like any adapter the agent loads, and applied at the scale the
name carries. Only callers holding the backend key (DRAFTLOOP_BACKEND_API_KEY, a bearer token)
may use it: the names are not secret, and the tenant's share and rate limits were applied by the
server that received the request."""

import hmac
import json
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from agent.adapters import AdapterRef
from agent.drafting import Drafter, IncrementalText
from agent.repetition import RepetitionGuard
from api import disconnect
from api.deps import DrafterDep, SessionDep, SettingsDep
from api.openai_schemas import TokenCompletionRequest
from core.errors import Conflict, Forbidden, Invalid, TooLarge, Unauthorized
from core.settings import Settings
from training import registry

router = APIRouter(prefix="/v1", tags=["drafting server"])
PATHS = ("/v1/completions",)  # errors here take OpenAI's shape
BASE = "base"

_bearer = HTTPBearer(auto_error=False, description="The backend key shared by draftloop's servers")


def backend_caller(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)], settings: SettingsDep
) -> None:
    if not settings.backend_api_key:
        raise Forbidden(
            "this server drafts for other servers only with a backend key: set DRAFTLOOP_BACKEND_API_KEY, "
            "the same on this server and on those that draft through it"
        )
    sent = credentials.credentials if credentials else ""
    if not hmac.compare_digest(sent.encode(), settings.backend_api_key.encode()):
        raise Unauthorized("send the backend key (DRAFTLOOP_BACKEND_API_KEY) as a bearer token")


def _prepare(request: TokenCompletionRequest, session, drafter: Drafter, settings: Settings):
    """The adapter, the guard and the token budget of a request, or a clear error."""
    if drafter.backend.name != "local":
        raise Forbidden(f"this server drafts through {drafter.backend.name} itself; send completions to that one")
    if request.temperature not in (None, 0):
        raise Invalid("draftloop decodes greedily: send temperature 0 (or none)")
    if request.base_fingerprint not in (None, drafter.fingerprint):
        raise Conflict("the caller's base model is not the one this server drafts with (their fingerprints differ)")
    if len(request.prompt) > settings.max_prompt_tokens:
        raise TooLarge(f"the prompt is {len(request.prompt)} tokens; the limit is {settings.max_prompt_tokens}")
    if max(request.prompt) >= len(drafter.tokenizer):
        raise Invalid(f"the prompt has token id {max(request.prompt)}; the vocabulary has {len(drafter.tokenizer)}")
    if not set(request.stop_token_ids) <= drafter.backend.stop_ids:
        raise Invalid(f"stop_token_ids may only name the model's end-of-turn ids {sorted(drafter.backend.stop_ids)}")
    max_new_tokens = settings.reply_length(request.max_tokens, "max_tokens")
    adapter: AdapterRef | None = None
    if request.model != BASE:
        adapter = registry.ref_by_served_name(session, settings, request.model, drafter.fingerprint)
    session.commit()  # nothing is held while the model works
    guard = RepetitionGuard(  # the caller stops cycles itself (agent/stream.emit)
        repetition_penalty=request.repetition_penalty or 1.0,
        no_repeat_ngram_size=request.no_repeat_ngram_size or 0,
        frequency_penalty=request.frequency_penalty or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
    )
    return adapter, guard, max_new_tokens


def _finish(stream, stop_ids: set[int]) -> dict:
    stopped = stream.finish_reason == "stop"
    return {
        "finish_reason": "stop" if stopped else "length",
        "stop_reason": stream.tokens[-1] if stopped and stream.tokens[-1] in stop_ids else None,
    }


@router.post(
    "/completions",
    summary="Completions from token ids, for servers that draft through this one",
    dependencies=[Depends(backend_caller)],
    responses={200: {"content": {"text/event-stream": {}}, "description": "With stream: true, chunks as SSE"}},
)
async def token_completions(
    http: Request, request: TokenCompletionRequest, session: SessionDep, drafter: DrafterDep, settings: SettingsDep
):
    adapter, guard, max_new_tokens = await run_in_threadpool(_prepare, request, session, drafter, settings)
    stream = drafter.submit(request.prompt, max_new_tokens=max_new_tokens, adapter=adapter, guard=guard)
    stop_ids = drafter.backend.stop_ids
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
    head["model"] = request.model

    def choice(tokens: list[int], text: str, finish: dict | None) -> dict:
        ids = {"token_ids": tokens} if request.return_token_ids else {}
        return {"index": 0, "text": text, **ids, **(finish or {"finish_reason": None})}

    if not request.stream:
        await disconnect.finished(http, [stream])
        tokens = stream.result()
        text = drafter.tokenizer.decode(tokens, skip_special_tokens=request.skip_special_tokens)
        usage = {"prompt_tokens": len(request.prompt), "completion_tokens": len(tokens)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {**head, "choices": [choice(tokens, text, _finish(stream, stop_ids))], "usage": usage}

    await stream.started()  # errors before the first token are answered as errors, not as a stream

    async def events():
        text, sent = IncrementalText(drafter.tokenizer), 0
        try:
            async for _ in stream:
                new, sent = stream.tokens[sent:], len(stream.tokens)
                yield f"data: {json.dumps({**head, 'choices': [choice(new, text.delta(stream.tokens), None)]})}\n\n"
            yield f"data: {json.dumps({**head, 'choices': [choice([], '', _finish(stream, stop_ids))]})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            stream.cancel()  # the caller left (a draft it cut as a cycle): stop decoding

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
