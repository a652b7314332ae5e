import asyncio
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from agent.adapters import AdapterRef
from agent.drafting import Drafter, DraftResult, IncrementalText
from agent.prompt import IncomingEmail
from agent.repetition import RepetitionGuard
from agent.stream import TokenStream
from api import disconnect
from api.deps import AgentKey, AnyKey, DrafterDep, SessionDep, SessionsDep, SettingsDep
from api.schemas import DecodingOptions, DraftBatchRequest, DraftOut, DraftPage, DraftRequest, EmailIn, Id
from core.db import Sessions
from core.errors import TooLarge
from core.settings import Settings
from feedback import service
from feedback.models import ApiKey, Draft
from training import registry, shadow

router = APIRouter(prefix="/v1/drafts", tags=["drafts"])


@dataclass(frozen=True)
class _Job:
    """What drafting for one key needs, read from the database before the model runs."""

    tenant_id: int
    key_id: int
    instructions: str
    adapter: AdapterRef | None  # the champion's; None: the base model
    shadow: AdapterRef | None  # the shadow's, drafting beside the champion (training/shadow.py)
    max_new_tokens: int
    guard: RepetitionGuard

    def submit_shadows(self, drafter: Drafter, prompts: list[list[int]]) -> list[TokenStream]:
        """The shadow's drafts of the same prompts, best effort: none without a shadow or room."""
        if self.shadow is None:
            return []
        streams = drafter.submit_shadow(
            prompts, max_new_tokens=self.max_new_tokens, adapter=self.shadow, guard=self.guard, tenant_id=self.tenant_id
        )
        return streams or []


def _job(emails: list[EmailIn], options: DecodingOptions, key: ApiKey, session, drafter: Drafter, settings: Settings):
    for email in emails:
        if len(email.body) > settings.max_email_chars:
            raise TooLarge(f"an email body has {len(email.body)} characters; the limit is {settings.max_email_chars}")
    max_new_tokens = settings.reply_length(options.max_new_tokens)
    adapter = registry.champion_ref(session, settings, key.tenant_id, drafter.fingerprint)
    shadow_adapter = shadow.serving_ref(session, settings, key.tenant_id, drafter.fingerprint)
    guard = drafter.guard_with(**options.guard_overrides())
    session.commit()  # nothing is held while the model works
    return _Job(key.tenant_id, key.id, key.tenant.instructions, adapter, shadow_adapter, max_new_tokens, guard)


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


async def _draft_and_store(
    http: Request,
    emails: list[EmailIn],
    job: _Job,
    session,
    sessions: Sessions,
    drafter: Drafter,
    background: BackgroundTasks,
) -> list[Draft]:
    """Draft replies with the tenant's champion adapter (or the base model) and store them; with
    a shadow, its drafts of the same emails decode in the same batch and are stored after the
    response (training/shadow.store_drafts), never shown.

    No transaction is open while the model works (`_job` committed its reads), and the drafts
    are stored and committed in one step, so a request never holds a pooled connection, or on
    SQLite the write lock, while it waits. A client that leaves before its drafts are done
    cancels them (nothing is stored, the shadow's neither)."""
    incoming = [IncomingEmail(sender=e.sender, subject=e.subject, body=e.body) for e in emails]
    prompts = await run_in_threadpool(lambda: [drafter.prompt(job.instructions, email) for email in incoming])
    streams = drafter.submit_many(
        prompts, max_new_tokens=job.max_new_tokens, adapter=job.adapter, guard=job.guard, tenant_id=job.tenant_id
    )
    shadows = job.submit_shadows(drafter, prompts)
    try:
        await disconnect.finished(http, streams)
        results = [drafter.result(prompt, stream) for prompt, stream in zip(prompts, streams, strict=True)]

        def store() -> list[Draft]:
            drafts = [_store(session, job, drafter, e, result) for e, result in zip(emails, results, strict=True)]
            session.commit()
            return drafts

        drafts = await run_in_threadpool(store)
    except BaseException:
        for stream in shadows:
            stream.cancel()
        raise
    if shadows:
        shadowed = list(zip([d.id for d in drafts], prompts, shadows, strict=True))
        background.add_task(shadow.store_drafts, sessions, drafter, job.shadow.id, shadowed)
    return drafts


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DraftOut, summary="Draft a reply")
async def create_draft(
    http: Request,
    request: DraftRequest,
    key: AgentKey,
    session: SessionDep,
    sessions: SessionsDep,
    drafter: DrafterDep,
    settings: SettingsDep,
    background: BackgroundTasks,
):
    """Draft a reply to an incoming email with the tenant's champion adapter (or the base model),
    and store it for review."""
    job = await run_in_threadpool(_job, [request], request, key, session, drafter, settings)
    return (await _draft_and_store(http, [request], job, session, sessions, drafter, background))[0]


@router.post(
    "/batch", status_code=status.HTTP_201_CREATED, response_model=list[DraftOut], summary="Draft several replies"
)
async def create_drafts(
    http: Request,
    request: DraftBatchRequest,
    key: AgentKey,
    session: SessionDep,
    sessions: SessionsDep,
    drafter: DrafterDep,
    settings: SettingsDep,
    background: BackgroundTasks,
):
    """Draft replies to up to 32 emails, decoded side by side (a backlog, an inbox import)."""
    job = await run_in_threadpool(_job, request.emails, request, key, session, drafter, settings)
    return await _draft_and_store(http, request.emails, job, session, sessions, drafter, background)


_unfinished: set[asyncio.Task] = set()  # drafts whose client left, and shadows' drafts: stored when they end


def _detach(work: Callable[[], None]) -> None:
    """Run work in a thread after the response has gone on (a draft stored when it ends)."""
    task = asyncio.create_task(asyncio.to_thread(work))
    _unfinished.add(task)
    task.add_done_callback(_unfinished.discard)


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
    returns it). The draft is stored when decoding ends, also when the client has left early; so
    is the shadow's, decoded beside it (never streamed), when it ends."""
    job = await run_in_threadpool(_job, [request], request, key, session, drafter, settings)
    incoming = IncomingEmail(sender=request.sender, subject=request.subject, body=request.body)
    prompt = await run_in_threadpool(drafter.prompt, job.instructions, incoming)
    stream = drafter.submit(
        prompt, max_new_tokens=job.max_new_tokens, adapter=job.adapter, guard=job.guard, tenant_id=job.tenant_id
    )
    shadows = job.submit_shadows(drafter, [prompt])
    try:
        await stream.started()  # a backend that is overloaded or unreachable answers 503 before the stream starts
    except BaseException:
        for shadow_stream in shadows:
            shadow_stream.cancel()
        raise

    def store() -> tuple[str, int]:
        result = drafter.result(prompt, stream)
        with sessions() as store_session:
            draft = _store(store_session, job, drafter, request, result)
            return DraftOut.model_validate(draft).model_dump_json(), draft.id

    def store_shadow(draft_id: int) -> None:
        if shadows:
            shadow.store_drafts(sessions, drafter, job.shadow.id, [(draft_id, prompt, shadows[0])])

    async def events():
        text = IncrementalText(drafter.tokenizer)
        storing = False
        try:
            async for _ in stream:
                if delta := text.delta(stream.tokens):
                    yield f"event: token\ndata: {json.dumps({'text': delta})}\n\n"
            storing = True
            stored, draft_id = await run_in_threadpool(store)
            _detach(lambda: store_shadow(draft_id))
            yield f"event: draft\ndata: {stored}\n\n"
        finally:
            if not storing and stream.error is None:
                _detach(lambda: store_shadow(store()[1]))
            elif not storing:
                for shadow_stream in shadows:
                    shadow_stream.cancel()

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
