"""The review queue and the draft page: accept, edit or reject, then on to the next draft."""

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Form, Request
from fastapi.responses import RedirectResponse

from api.deps import SessionDep, SessionsDep, SettingsDep
from api.schemas import Id, Text, text
from api.web.auth import CSRF, PageKey
from api.web.templating import flash, render
from core.errors import Invalid
from feedback import service
from feedback.models import ApiKey, Draft, Verdict
from training import registry, shadow

QUEUE_SHOWN = 100

router = APIRouter()


def _last_saved(request: Request, session, key: ApiKey) -> Draft | None:
    """The draft saved by the previous request, shown once with its diff."""
    draft_id = request.session.pop("saved", None)
    return service.get_draft(session, key.tenant_id, draft_id) if draft_id is not None else None


@router.get("/", name="home")
def home(request: Request):
    return RedirectResponse(request.url_for("web:queue"), status_code=303)


@router.get("/queue", name="queue")
def queue(request: Request, key: PageKey, session: SessionDep):
    found = service.review_queue(session, key.tenant_id, limit=QUEUE_SHOWN)
    return render(request, "queue.html", key=key, queue=found, saved=_last_saved(request, session, key))


@router.get("/drafts/{draft_id}", name="draft")
def draft_page(request: Request, draft_id: Id, key: PageKey, session: SessionDep):
    draft = service.get_draft(session, key.tenant_id, draft_id)
    previous, following = service.pending_neighbours(session, draft)
    versions = {adapter.id: adapter.version for adapter in registry.list_adapters(session, key.tenant_id)}
    return render(
        request,
        "draft.html",
        key=key,
        draft=draft,
        adapter_version=versions.get(draft.adapter_id),
        previous=previous,
        following=following,
        pending=service.review_queue(session, key.tenant_id, limit=1).pending,
        saved=_last_saved(request, session, key),
    )


def correction_from_form(draft: Draft, action: str, text: str, reason: str) -> service.CorrectionInput:
    """What the buttons mean. Browsers send a textarea with CRLF line ends; a 'save' of the
    unchanged draft is an acceptance, and a rejection keeps the text only if it was rewritten."""
    text = text.replace("\r\n", "\n").strip()
    changed = text != draft.draft_text.strip()
    if action == "accept" or (action == "edit" and not changed):
        return service.CorrectionInput(Verdict.accepted, None, reason)
    if action == "edit":
        return service.CorrectionInput(Verdict.edited, text, reason)
    if action == "reject":
        return service.CorrectionInput(Verdict.rejected, text if changed else None, reason)
    raise Invalid(f"unknown action {action!r}: use accept, edit or reject")


@router.post("/drafts/{draft_id}", name="correct", dependencies=[CSRF])
def correct(
    request: Request,
    draft_id: Id,
    key: PageKey,
    session: SessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    background: BackgroundTasks,
    action: Annotated[Text, Form()],
    final_text: Annotated[text(max_length=50_000), Form()] = "",
    reason: Annotated[text(max_length=2_000), Form()] = "",
):
    draft = service.get_draft(session, key.tenant_id, draft_id)
    correction, created = service.submit_correction(
        session,
        draft=draft,
        correction=correction_from_form(draft, action, final_text, reason),
        reviewer_key=key,
        idempotency_key=None,
        heldout_fraction=settings.heldout_fraction,
    )
    if created and shadow.score_correction(session, correction):  # as the JSON route does
        background.add_task(shadow.decide_after_correction, sessions, settings, key.tenant_id)
    request.session["saved"] = draft.id
    _, following = service.pending_neighbours(session, draft)
    following = following or next(iter(service.review_queue(session, key.tenant_id, limit=1).drafts), None)
    if following is None:
        flash(request, "The queue is clear: every draft has a correction.")
        return RedirectResponse(request.url_for("web:queue"), status_code=303)
    return RedirectResponse(request.url_for("web:draft", draft_id=following.id), status_code=303)
