from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Header, Query, Response, status

from api.deps import ReviewerKey, SessionDep, SessionsDep, SettingsDep
from api.schemas import CorrectionOut, CorrectionRequest, Id, ReviewQueueOut, text
from core.errors import Conflict
from feedback import service
from training import shadow

router = APIRouter(prefix="/v1", tags=["review"])


@router.get("/review-queue", response_model=ReviewQueueOut, summary="Drafts waiting for review, oldest first")
def review_queue(key: ReviewerKey, session: SessionDep, limit: Annotated[int, Query(ge=1, le=200)] = 50):
    queue = service.review_queue(session, key.tenant_id, limit=limit)
    return ReviewQueueOut(pending=queue.pending, items=queue.drafts)


@router.post(
    "/drafts/{draft_id}/correction",
    response_model=CorrectionOut,
    status_code=status.HTTP_201_CREATED,
    summary="Submit the reviewer's correction of a draft",
    responses={200: {"description": "The same correction was already stored; it is returned as it is"}},
)
def submit_correction(
    draft_id: Id,
    request: CorrectionRequest,
    key: ReviewerKey,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    response: Response,
    background: BackgroundTasks,
    idempotency_key: Annotated[text(max_length=200) | None, Header()] = None,
):
    """One correction per draft. Sending the same correction again, or the same Idempotency-Key,
    returns the stored one (200); a different correction for a corrected draft is a 409 whose
    `stored` is the correction kept. A draft with a shadow's draft beside it scores both."""
    draft = service.get_draft(session, key.tenant_id, draft_id)
    try:
        correction, created = service.submit_correction(
            session,
            draft=draft,
            correction=service.CorrectionInput(request.verdict, request.final_text, request.reason),
            reviewer_key=key,
            idempotency_key=idempotency_key,
            heldout_fraction=settings.heldout_fraction,
        )
    except Conflict as conflict:
        raise Conflict(
            conflict.message, CorrectionOut.model_validate(conflict.stored).model_dump(mode="json")
        ) from None
    if not created:
        response.status_code = status.HTTP_200_OK
    elif shadow.score_correction(session, correction):  # decided after the commit, never failing it
        background.add_task(shadow.decide_after_correction, sessions, settings, key.tenant_id)
    return correction
