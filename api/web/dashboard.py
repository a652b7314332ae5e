"""The admin's dashboard: adapter versions and their scores, the last run, trigger, promote, roll
back, the tenant's adapter scale, and the shadow's live comparison with its setting."""

from collections.abc import Callable
from typing import Annotated, Literal, get_args

from fastapi import APIRouter, BackgroundTasks, Form, Request
from fastapi.responses import RedirectResponse

from api.deps import SessionDep, SettingsDep
from api.schemas import Id, text
from api.web.auth import CSRF, AdminPageKey
from api.web.chart import versions_chart
from api.web.templating import flash, render
from core.errors import Invalid
from feedback.models import Tenant
from feedback.service import review_stats_by_adapter, set_adapter_scale
from training import registry, shadow
from training.config import Preference, PreferenceReference, TrainConfig
from training.runs import active_run, create_run, list_runs
from training.tasks import enqueue

router = APIRouter(prefix="/dashboard")

Reason = Annotated[text(max_length=2_000), Form()]


def _reason(text: str) -> str:
    if not text.strip():
        raise Invalid("give a reason: it is kept in the audit log")
    return text.strip()


def _back(request: Request) -> RedirectResponse:
    return RedirectResponse(request.url_for("web:dashboard"), status_code=303)


@router.get("", name="dashboard")
def dashboard(request: Request, key: AdminPageKey, session: SessionDep):
    adapters = registry.list_adapters(session, key.tenant_id)
    active = active_run(session, key.tenant_id)
    champion = registry.champion(session, key.tenant_id)
    drafting = registry.drafting_adapter(session, key.tenant_id)
    inherited = drafting if drafting is not None and champion is None else None  # the organization's
    return render(
        request,
        "dashboard.html",
        key=key,
        adapters=adapters,
        champion=champion,
        inherited=inherited,
        organization=session.get(Tenant, inherited.tenant_id) if inherited else None,
        served_scale=registry.served_scale(session, champion) if champion else None,
        run=active or next(iter(list_runs(session, key.tenant_id, limit=1)), None),
        active=active is not None,
        stats=review_stats_by_adapter(session, key.tenant_id),
        shadow=shadow.status(session, key.tenant_id),
        chart=versions_chart(adapters),
        preferences=get_args(Preference),
        references=get_args(PreferenceReference),
        default_preference=TrainConfig.preference,
    )


@router.post("/runs", name="trigger_run", dependencies=[CSRF])
def trigger_run(
    request: Request,
    key: AdminPageKey,
    session: SessionDep,
    background: BackgroundTasks,
    preference: Annotated[Preference | Literal[""], Form()] = "",
    reference: Annotated[PreferenceReference | Literal[""], Form()] = "",
):
    """Queue a run with the defaults, or with the preference training and reference chosen on the
    page; preference training alone refers to the frozen base unless the champion is chosen."""
    if preference == "alone" and not reference:
        reference = "base"
    overrides = {"preference": preference} if preference else {}
    if reference:
        overrides["preference_reference"] = reference
    run = create_run(session, key.tenant_id, trigger="web", requested_by=key.name, overrides=overrides or None)
    background.add_task(enqueue, [run.id])  # after the commit, as the JSON route does
    flash(request, f"Run {run.id} is queued; a worker trains, evaluates and gates it.")
    return _back(request)


@router.post("/promote", name="promote", dependencies=[CSRF])
def promote(
    request: Request,
    key: AdminPageKey,
    session: SessionDep,
    settings: SettingsDep,
    version: Annotated[Id, Form()],
    reason: Reason = "",
):
    adapter = registry.get_adapter(session, key.tenant_id, version=version)
    registry.promote(session, settings, adapter, actor=key.name, reason=_reason(reason))
    flash(request, f"Version {version} is the champion now.")
    return _back(request)


@router.post("/rollback", name="rollback", dependencies=[CSRF])
def rollback(request: Request, key: AdminPageKey, session: SessionDep, reason: Reason = ""):
    restored = registry.rollback(session, key.tenant_id, actor=key.name, reason=_reason(reason))
    now = f"version {restored.version} is the champion" if restored else "drafts come from the base model"
    flash(request, f"Rolled back: {now}.")
    return _back(request)


Number = Annotated[text(strip=True, max_length=20), Form()]  # a form's number, parsed by its route


def _number(raw: str, parse: Callable[[str], float], what: str) -> float | None:
    """A form's number: None when the field is empty; an Invalid error saying `what` when it is no number."""
    try:
        return parse(raw) if raw else None
    except ValueError:
        raise Invalid(f"{what}, not {raw!r}") from None


@router.post("/scale", name="adapter_scale", dependencies=[CSRF])
def adapter_scale(request: Request, key: AdminPageKey, session: SessionDep, scale: Number = ""):
    """Set the scale every version is served at; empty: each version at its own chosen scale."""
    value = _number(scale, float, "the adapter scale must be a number")
    set_adapter_scale(session, key.tenant, value)
    if value is None:
        flash(request, "Each version is served at its own chosen scale now.")
    else:
        flash(request, f"Adapters are served at scale {value:g} now.")
    return _back(request)


@router.post("/shadow", name="shadow_corrections", dependencies=[CSRF])
def shadow_corrections(request: Request, key: AdminPageKey, session: SessionDep, count: Number = ""):
    """Set how many live corrections decide a shadow; empty: candidates are promoted at once."""
    value = _number(count, int, "the number of corrections must be a whole number")
    shadow.set_corrections(session, key.tenant, value, actor=key.name)
    if value is None:
        flash(request, "A candidate that passes the gate is promoted at once now.")
    else:
        flash(request, f"A candidate that passes the gate drafts in shadow for {value} corrections now.")
    return _back(request)
