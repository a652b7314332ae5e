from typing import Annotated

from fastapi import APIRouter, Query, status

from agent.drafting import Drafter
from agent.prompt import IncomingEmail
from api.deps import AgentKey, AnyKey, DrafterDep, SessionDep, SettingsDep
from api.schemas import DraftBatchRequest, DraftOut, DraftPage, DraftRequest, EmailIn
from core.errors import Invalid, TooLarge
from core.settings import Settings
from feedback import service
from feedback.models import ApiKey, Draft
from training import registry

router = APIRouter(prefix="/v1/drafts", tags=["drafts"])


def _draft_and_store(
    emails: list[EmailIn], max_new_tokens: int | None, key: ApiKey, session, drafter: Drafter, settings: Settings
) -> list[Draft]:
    """Draft replies with the tenant's champion adapter (or the base model) and store them."""
    for email in emails:
        if len(email.body) > settings.max_email_chars:
            raise TooLarge(f"an email body has {len(email.body)} characters; the limit is {settings.max_email_chars}")
    max_new_tokens = max_new_tokens or settings.max_new_tokens
    if max_new_tokens > settings.max_new_tokens_limit:
        raise Invalid(f"max_new_tokens is {max_new_tokens}; the limit is {settings.max_new_tokens_limit}")
    champion = registry.champion(session, key.tenant_id)
    adapter = registry.serving_ref(settings, champion, drafter.fingerprint) if champion else None
    incoming = [IncomingEmail(sender=e.sender, subject=e.subject, body=e.body) for e in emails]
    results = drafter.draft_many(key.tenant.instructions, incoming, max_new_tokens=max_new_tokens, adapter=adapter)
    return [
        service.record_draft(
            session,
            tenant_id=key.tenant_id,
            created_by_key_id=key.id,
            sender=email.sender,
            subject=email.subject,
            body=email.body,
            draft_text=result.text,
            base_model=drafter.model_id,
            adapter_id=champion.id if champion else None,
            generation={"max_new_tokens": max_new_tokens, "decoding": "greedy"},
            prompt_tokens=result.prompt_tokens,
            tokens_generated=result.tokens_generated,
            finish_reason=result.finish_reason,
            latency_ms=result.latency_ms,
        )
        for email, result in zip(incoming, results, strict=True)
    ]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DraftOut, summary="Draft a reply")
def create_draft(request: DraftRequest, key: AgentKey, session: SessionDep, drafter: DrafterDep, settings: SettingsDep):
    """Draft a reply to an incoming email with the tenant's champion adapter (or the base model),
    and store it for review."""
    return _draft_and_store([request], request.max_new_tokens, key, session, drafter, settings)[0]


@router.post(
    "/batch", status_code=status.HTTP_201_CREATED, response_model=list[DraftOut], summary="Draft several replies"
)
def create_drafts(
    request: DraftBatchRequest, key: AgentKey, session: SessionDep, drafter: DrafterDep, settings: SettingsDep
):
    """Draft replies to up to 32 emails in one batched generation (a backlog, an inbox import)."""
    return _draft_and_store(request.emails, request.max_new_tokens, key, session, drafter, settings)


@router.get("/{draft_id}", response_model=DraftOut, summary="Get a draft and its correction")
def get_draft(draft_id: int, key: AnyKey, session: SessionDep):
    return service.get_draft(session, key.tenant_id, draft_id)


@router.get("", response_model=DraftPage, summary="List drafts, newest first")
def list_drafts(
    key: AnyKey,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before_id: Annotated[int | None, Query(description="next_before_id of the previous page")] = None,
):
    drafts = service.list_drafts(session, key.tenant_id, limit=limit, before_id=before_id)
    return DraftPage(items=drafts, next_before_id=drafts[-1].id if len(drafts) == limit else None)
