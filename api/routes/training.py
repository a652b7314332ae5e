import threading
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, status
from fastapi.responses import PlainTextResponse, StreamingResponse

from api.deps import AdminKey, AnyKey, SessionDep, SettingsDep
from api.schemas import AdapterOut, AuditReason, CombineRequest, Id, RunOut, RunRequest, ShadowOut
from core.errors import Invalid, NotFound, Overloaded
from feedback.models import Split
from training import compose, registry, shadow
from training.export import export_archive, export_source
from training.models import ExportFormat, GgufDtype, SnapshotKind
from training.runs import create_run, export_snapshot, get_run, list_runs
from training.tasks import enqueue

router = APIRouter(prefix="/v1", tags=["training"])


@router.post("/runs", response_model=RunOut, status_code=status.HTTP_202_ACCEPTED, summary="Trigger a training run")
def trigger_run(request: RunRequest, key: AdminKey, session: SessionDep, background: BackgroundTasks):
    """Queue a run for the tenant now; a worker trains, evaluates and gates it. One active run
    per tenant: a second trigger while one is queued or running is a 409. The run is sent to
    the broker after the request commits; if the broker is down it stays queued and is sent later."""
    overrides = request.overrides.model_dump(exclude_unset=True)  # the settings given; TrainConfig's for the rest
    run = create_run(session, key.tenant_id, trigger="api", requested_by=key.name, overrides=overrides)
    background.add_task(enqueue, [run.id])
    return run


@router.post(
    "/adapters/combine",
    response_model=RunOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Combine the organization's adapter with this team's",
)
def combine(
    request: CombineRequest, key: AdminKey, session: SessionDep, settings: SettingsDep, background: BackgroundTasks
):
    """Queue a run that combines an adapter of this team's organization with one of this team's
    (each by default its champion) into a new version of the team, which is evaluated and gated
    like a trained candidate. A 422 if this tenant is no team; a 409 while another run is active."""
    composition = compose.plan(session, settings, key.tenant, **request.model_dump())
    run = create_run(session, key.tenant_id, trigger="api", requested_by=key.name, composition=composition)
    background.add_task(enqueue, [run.id])
    return run


@router.get("/runs", response_model=list[RunOut], summary="Training runs, newest first")
def runs(key: AnyKey, session: SessionDep, limit: Annotated[int, Query(ge=1, le=200)] = 20):
    return list_runs(session, key.tenant_id, limit=limit)


@router.get("/runs/{run_id}", response_model=RunOut, summary="A run: status, progress, scores, the gate's decision")
def run(run_id: Id, key: AnyKey, session: SessionDep):
    return get_run(session, key.tenant_id, run_id)


@router.get(
    "/runs/{run_id}/dataset",
    response_class=PlainTextResponse,
    summary="A run's dataset snapshot as JSONL",
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
def run_dataset(
    run_id: Id,
    key: AdminKey,
    session: SessionDep,
    settings: SettingsDep,
    split: Split = Split.train,
    kind: SnapshotKind = SnapshotKind.sft,
):
    """The exact rows the run trained on (or was evaluated on, with split=heldout), in TRL's
    prompt/completion format, or with kind=preference the train split's prompt/chosen/rejected
    pairs it trained with; rebuilt from the stored corrections and checked against the hash."""
    found = get_run(session, key.tenant_id, run_id)
    if kind == SnapshotKind.preference:
        if split != Split.train:
            raise Invalid("preference pairs come from the train split only")
        snapshot_id, name = found.preference_snapshot_id, "preference"
    else:
        snapshot_id = found.train_snapshot_id if split == Split.train else found.heldout_snapshot_id
        name = str(split)
    if snapshot_id is None:
        raise NotFound(f"run {run_id} has no {name} snapshot (yet)")
    body = export_snapshot(session, snapshot_id, settings)
    return PlainTextResponse(body, media_type="application/x-ndjson")


@router.get("/adapters", response_model=list[AdapterOut], summary="The tenant's adapter versions")
def adapters(key: AnyKey, session: SessionDep):
    return registry.list_adapters(session, key.tenant_id)


@router.post("/adapters/{version}/promote", response_model=AdapterOut, summary="Make a version the champion")
def promote(version: Id, request: AuditReason, key: AdminKey, session: SessionDep, settings: SettingsDep):
    """Bypasses the gate (the reason goes to the audit log), not the checks: a version whose run
    is still evaluating it, or whose files are missing, changed or trained on another base model,
    is refused (409) and the champion stays as it is."""
    adapter = registry.get_adapter(session, key.tenant_id, version=version)
    return registry.promote(session, settings, adapter, actor=key.name, reason=request.reason)


# Merged and GGUF exports load a float32 copy of the base model: one at a time per server process.
_MODEL_EXPORTS = threading.Semaphore(1)


@router.get(
    "/adapters/{version}/export",
    response_class=StreamingResponse,
    summary="A version exported for other tools, as an archive",
    responses={
        200: {
            "description": "A tar of one folder (gzip-compressed for peft) with the export and its model card",
            "content": {"application/gzip": {}, "application/x-tar": {}},
        }
    },
)
def export_adapter(
    version: Id,
    key: AdminKey,
    session: SessionDep,
    settings: SettingsDep,
    format: ExportFormat = ExportFormat.peft,
    dtype: GgufDtype = GgufDtype.float16,
):
    """`peft`: the adapter's PEFT files; `merged`: the base model with the adapter merged in at the
    scale it is served at (transformers, safetensors); `gguf`: the merged model as a GGUF file (in
    `dtype`) with an Ollama Modelfile. Each with a model card (README.md): the base model and its
    fingerprint, the dataset snapshots' hashes, the hyper-parameters, the held-out scores and the
    gate's decision. A version whose files fail the registry's checks is a 409. A merged or gguf
    export loads the base model: one at a time per server, 503 with Retry-After meanwhile."""
    source = export_source(session, settings, key.tenant_id, version)
    session.commit()  # the export takes a while: hold no connection meanwhile
    if format == ExportFormat.peft:
        filename, chunks = export_archive(source, settings, format, dtype=dtype)
    elif _MODEL_EXPORTS.acquire(blocking=False):
        try:
            filename, chunks = export_archive(source, settings, format, dtype=dtype)
        finally:
            _MODEL_EXPORTS.release()
    else:
        raise Overloaded("another merged or gguf export is being written on this server; retry", retry_after_s=30)
    media_type = "application/gzip" if filename.endswith(".gz") else "application/x-tar"
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    return StreamingResponse(chunks, media_type=media_type, headers=headers)


@router.post("/adapters/rollback", response_model=AdapterOut | None, summary="Roll back the champion")
def rollback(request: AuditReason, key: AdminKey, session: SessionDep):
    """Rejects the champion and restores the previous one; null means the base model again."""
    return registry.rollback(session, key.tenant_id, actor=key.name, reason=request.reason)


@router.get("/shadow", response_model=ShadowOut, summary="The shadow's live comparison with the champion")
def shadow_status(key: AnyKey, session: SessionDep):
    """The version drafting in shadow (never shown) against the champion on the corrections
    scored so far, and the last shadow decided on its live scores, with the figures it was
    decided on."""
    return shadow.status(session, key.tenant_id)
