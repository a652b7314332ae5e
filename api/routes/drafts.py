import asyncio
import dataclasses
import json
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from agent.adapters import AdapterRef
from agent.drafting import Drafter, DraftResult, IncrementalText
from agent.prompt import IncomingEmail
from agent.repetition import RepetitionGuard
from api import disconnect
from api.deps import AgentKey, AnyKey, DrafterDep, SessionDep, SessionsDep, SettingsDep
from api.schemas import DecodingOptions, DraftBatchRequest, DraftOut, DraftPage, DraftRequest, EmailIn, Id
from core.errors import TooLarge
from core.settings import Settings
from feedback import service
from feedback.models import ApiKey, Draft
from training import registry

router = APIRouter(prefix="/v1/drafts", tags=["drafts"])


@dataclass(frozen=True)
class _Job:
    """What drafting for one key needs, read from the database before the model runs."""

    tenant_id: int
    key_id: int
    instructions: str
    adapter: AdapterRef | None  # the champion's; None: the base model
    max_new_tokens: int
    guard: RepetitionGuard


def _job(emails: list[EmailIn], options: DecodingOptions, key: ApiKey, session, drafter: Drafter, settings: Settings):
    for email in emails:
        if len(email.body) > settings.max_email_chars:
            raise TooLarge(f"an email body has {len(email.body)} characters; the limit is {settings.max_email_chars}")
    max_new_tokens = settings.reply_length(options.max_new_tokens)
    adapter = registry.champion_ref(session, settings, key.tenant_id, drafter.fingerprint)
    guard = drafter.guard_with(**options.guard_overrides())
    session.commit()  # nothing is held while the model works
    return _Job(key.tenant_id, key.id, key.tenant.instructions, adapter, max_new_tokens, guard)


def _store(session, job: _Job, drafter: Drafter, email: EmailIn, result: DraftResult) -> Draft:
    return service.record_draft(
        session,
        tenant_id=job.tenant_id,
        created_by_key_id=job.key_id,
        sender=email.sender,
        subject=email.subject,
        body=email.body,
        draft_text=result.text,
        base_model=drafter.model_id,
        adapter_id=job.adapter.id if job.adapter else None,
        backend=drafter.backend.name,
        generation={
            "max_new_tokens": job.max_new_tokens,
            "decoding": "greedy",
            "adapter_scale": job.adapter.scale if job.adapter else None,
            **dataclasses.asdict(job.guard),
        },
        prompt_tokens=result.prompt_tokens,
        tokens_generated=result.tokens_generated,
        finish_reason=result.finish_reason,
        latency_ms=result.latency_ms,
    )


async def _draft_and_store(http: Request, emails: list[EmailIn], job: _Job, session, drafter: Drafter) -> list[Draft]:
    """Draft replies with the tenant's champion adapter (or the base model) and store them.

    No transaction is open while the model works (`_job` committed its reads), and the drafts
    are stored and committed in one step, so a request never holds a pooled connection, or on
    SQLite the write lock, while it waits. A client that leaves before its drafts are done
    cancels them (nothing is stored)."""
    incoming = [IncomingEmail(sender=e.sender, subject=e.subject, body=e.body) for e in emails]
    prompts = await run_in_threadpool(lambda: [drafter.prompt(job.instructions, email) for email in incoming])
    streams = drafter.submit_many(
        prompts, max_new_tokens=job.max_new_tokens, adapter=job.adapter, guard=job.guard, tenant_id=job.tenant_id
    )
    await disconnect.finished(http, streams)
    results = [drafter.result(prompt, stream) for prompt, stream in zip(prompts, streams, strict=True)]

    def store() -> list[Draft]:
        drafts = [_store(session, job, drafter, email, result) for email, result in zip(emails, results, strict=True)]
        session.commit()
        return drafts

    return await run_in_threadpool(store)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DraftOut, summary="Draft a reply")
async def create_draft(
    http: Request, request: DraftRequest, key: AgentKey, session: SessionDep, drafter: DrafterDep, settings: SettingsDep
):
    """Draft a reply to an incoming email with the tenant's champion adapter (or the base model),
    and store it for review."""
    job = await run_in_threadpool(_job, [request], request, key, session, drafter, settings)
    return (await _draft_and_store(http, [request], job, session, drafter))[0]


@router.post(
    "/batch", status_code=status.HTTP_201_CREATED, response_model=list[DraftOut], summary="Draft several replies"
)
async def create_drafts(
    http: Request,
    request: DraftBatchRequest,
    key: AgentKey,
    session: SessionDep,
    drafter: DrafterDep,
    settings: SettingsDep,
):
    """Draft replies to up to 32 emails, decoded side by side (a backlog, an inbox import)."""
    job = await run_in_threadpool(_job, request.emails, request, key, session, drafter, settings)
    return await _draft_and_store(http, request.emails, job, session, drafter)


_unfinished: set[asyncio.Task] = set()  # drafts whose client left: stored when they end


@router.post(
    "/stream",
    summary="Draft a reply, streaming it as it is written",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"}},
)
async def stream_draft(
    request: DraftRequest,
    key: AgentKey,
    session: SessionDep,
    sessions: SessionsDep,
    drafter: DrafterDep,
    settings: SettingsDep,
):
    """Server-sent events: `token` events carry the reply's text as it is decoded
    (`{"text": "..."}`), then one `draft` event carries the stored draft (as `GET /v1/drafts/{id}`
    returns it). The draft is stored when decoding ends, also when the client has left early."""
    job = await run_in_threadpool(_job, [request], request, key, session, drafter, settings)
    incoming = IncomingEmail(sender=request.sender, subject=request.subject, body=request.body)
    prompt = await run_in_threadpool(drafter.prompt, job.instructions, incoming)
    stream = drafter.submit(
        prompt, max_new_tokens=job.max_new_tokens, adapter=job.adapter, guard=job.guard, tenant_id=job.tenant_id
    )
    await stream.started()  # a backend that is overloaded or unreachable answers 503 before the stream starts

    def store() -> str:
        result = drafter.result(prompt, stream)
        with sessions() as store_session:
            return DraftOut.model_validate(_store(store_session, job, drafter, request, result)).model_dump_json()

    async def events():
        text = IncrementalText(drafter.tokenizer)
        storing = False
        try:
            async for _ in stream:
                if delta := text.delta(stream.tokens):
                    yield f"event: token\ndata: {json.dumps({'text': delta})}\n\n"
            storing = True
            yield f"event: draft\ndata: {await run_in_threadpool(store)}\n\n"
        finally:
            if not storing and stream.error is None:
                task = asyncio.create_task(asyncio.to_thread(store))
                _unfinished.add(task)
                task.add_done_callback(_unfinished.discard)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/{draft_id}", response_model=DraftOut, summary="Get a draft and its correction")
def get_draft(draft_id: Id, key: AnyKey, session: SessionDep):
    return service.get_draft(session, key.tenant_id, draft_id)


@router.get("", response_model=DraftPage, summary="List drafts, newest first")
def list_drafts(
    key: AnyKey,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before_id: Annotated[Id | None, Query(description="next_before_id of the previous page")] = None,
):
    drafts = service.list_drafts(session, key.tenant_id, limit=limit, before_id=before_id)
    return DraftPage(items=drafts, next_before_id=drafts[-1].id if len(drafts) == limit else None)
