"""The adapter registry: immutable, versioned PEFT adapter folders per tenant, recorded in the
database. Promotion, rollback and putting a version in shadow are one transaction each (the
caller commits) with an audit row; the database allows at most one champion and one shadow per
tenant. A shadow drafts beside the champion until its live scores decide (training/shadow.py); a
promotion of another version or a rollback ends it (rejected), since it was compared with the
champion that is no longer."""

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent.adapters import AdapterRef
from agent.base_model import fingerprint, model_source
from core.errors import Conflict, DomainError, NotFound
from core.settings import Settings
from feedback.models import Tenant
from feedback.service import MAX_ADAPTER_SCALE
from training.models import ACTIVE_RUN_STATUSES, Adapter, AdapterEvent, AdapterStatus, TrainingRun, utcnow

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_RANK = 256


class AdapterInvalid(DomainError):
    status_code = 409


def content_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update(name.encode() + b"\0")
        with (folder / name).open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def store_candidate(
    session: Session,
    settings: Settings,
    *,
    tenant_id: int,
    trained_dir: Path,
    base_model: str,
    base_fingerprint: str,
    config: dict,
    train_snapshot_id: int | None,
    training_run_id: int | None,
    scale: float = 1.0,
    composition: dict | None = None,
) -> Adapter:
    """Copy a trained adapter into the registry as the tenant's next version (a candidate), to
    be served at `scale` unless its tenant sets one.

    Only the two PEFT files are copied, into a temporary folder renamed into place, so a
    version folder is either complete or absent, and never changes afterwards. The registry may
    be a filesystem shared by many machines: the rename is atomic there too, and versions are
    numbered under the tenant's row lock. A folder of the new number that no row records was
    left by a writer that died between its rename and its commit; it is set aside, not reused."""
    lock_tenant(session, tenant_id)
    version = (session.scalar(select(func.max(Adapter.version)).where(Adapter.tenant_id == tenant_id)) or 0) + 1
    tenant_dir = settings.adapter_dir.resolve() / f"tenant-{tenant_id}"
    tenant_dir.mkdir(parents=True, exist_ok=True)
    folder = tenant_dir / f"v{version:04d}"
    if folder.exists():
        orphan = tenant_dir / f".orphan-{folder.name}-{uuid.uuid4().hex[:8]}"
        os.rename(folder, orphan)
        log.warning("set aside %s, which no registered version records, as %s", folder, orphan.name)
    scratch = Path(tempfile.mkdtemp(prefix=".incoming-", dir=tenant_dir))
    try:
        for name in ADAPTER_FILES:
            shutil.copyfile(trained_dir / name, scratch / name)
        _check_config(scratch)
        digest = content_hash(scratch)
        size = sum((scratch / name).stat().st_size for name in ADAPTER_FILES)
        os.rename(scratch, folder)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    adapter = Adapter(
        tenant_id=tenant_id,
        version=version,
        status=AdapterStatus.candidate,
        path=str(folder.relative_to(settings.adapter_dir.resolve())),
        content_hash=digest,
        size_bytes=size,
        base_model=base_model,
        base_model_fingerprint=base_fingerprint,
        train_snapshot_id=train_snapshot_id,
        training_run_id=training_run_id,
        config=config,
        scale=scale,
        composition=composition,
    )
    session.add(adapter)
    session.flush()
    return adapter


def _check_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as error:
        raise AdapterInvalid(f"{folder}: adapter_config.json is missing or not JSON ({error})") from error
    if config.get("peft_type") != "LORA":
        raise AdapterInvalid(f"{folder}: only LoRA adapters are allowed, not {config.get('peft_type')!r}")
    rank = config.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise AdapterInvalid(f"{folder}: LoRA rank {rank!r} is outside 1..{MAX_RANK}")
    return config


def rank_of(folder: Path) -> int:
    """The LoRA rank of an adapter folder."""
    return _check_config(folder)["r"]


def verified_path(settings: Settings, adapter: Adapter, base_fingerprint: str) -> Path:
    """The adapter's folder after checking it is safe and unchanged; raise AdapterInvalid if not.

    Checks: the folder is inside the registry (no symlinks or paths leading out), it holds
    exactly the two PEFT files (safetensors, never pickles), the config is LoRA within the rank
    bound, the content hash matches the database, and it was trained on this base model."""
    root = settings.adapter_dir.resolve()
    folder = root / adapter.path
    if folder.resolve() != folder or not folder.is_relative_to(root) or not folder.is_dir():
        raise AdapterInvalid(f"adapter {adapter.id}: folder {adapter.path!r} is missing or outside the registry")
    names = sorted(entry.name for entry in folder.iterdir())
    if names != sorted(ADAPTER_FILES) or any((folder / name).is_symlink() for name in names):
        raise AdapterInvalid(f"adapter {adapter.id}: expected exactly {list(ADAPTER_FILES)}, found {names}")
    _check_config(folder)
    if content_hash(folder) != adapter.content_hash:
        raise AdapterInvalid(f"adapter {adapter.id}: files changed since registration (content hash mismatch)")
    if adapter.base_model_fingerprint != base_fingerprint:
        raise AdapterInvalid(f"adapter {adapter.id} was trained on another base model than the one loaded")
    return folder


def champion(session: Session, tenant_id: int) -> Adapter | None:
    return _the(session, tenant_id, AdapterStatus.champion)


def shadow(session: Session, tenant_id: int) -> Adapter | None:
    """The version drafting in shadow beside the champion, if any."""
    return _the(session, tenant_id, AdapterStatus.shadow)


def _the(session: Session, tenant_id: int, status: AdapterStatus) -> Adapter | None:
    return session.scalar(
        select(Adapter)
        .where(Adapter.tenant_id == tenant_id, Adapter.status == status)
        .execution_options(populate_existing=True)  # as stored now, after a lock was waited for
    )


def lock_tenant(session: Session, tenant_id: int) -> None:
    """Serialize changes of the tenant's adapters: new versions, promotions and rollbacks wait for
    each other here (SQLite's write transactions are serialized already)."""
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())


def list_adapters(session: Session, tenant_id: int) -> list[Adapter]:
    return list(session.scalars(select(Adapter).where(Adapter.tenant_id == tenant_id).order_by(Adapter.version)))


def get_adapter(session: Session, tenant_id: int, *, version: int) -> Adapter:
    adapter = session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.version == version))
    if adapter is None:
        raise NotFound(f"no adapter version {version} for this tenant")
    return adapter


def _audit(session: Session, adapter_from: Adapter | None, adapter_to: Adapter | None, **fields) -> None:
    session.add(
        AdapterEvent(
            from_adapter_id=adapter_from.id if adapter_from else None,
            to_adapter_id=adapter_to.id if adapter_to else None,
            **fields,
        )
    )


def _check_servable(session: Session, settings: Settings, adapter: Adapter) -> None:
    """No run is still evaluating the version, and its files are complete, unchanged and trained
    on the base model this service loads (verified_path)."""
    run = session.get(TrainingRun, adapter.training_run_id) if adapter.training_run_id else None
    if run is not None and run.status in ACTIVE_RUN_STATUSES:
        raise Conflict(f"adapter version {adapter.version} is still being evaluated by run {run.id}; wait for it")
    verified_path(settings, adapter, fingerprint(model_source(settings)))


def promote(
    session: Session, settings: Settings, adapter: Adapter, *, actor: str, reason: str, scores: dict | None = None
) -> Adapter:
    """Make the adapter its tenant's champion; the previous champion is retired, and a shadow
    other than this adapter is rejected (it was compared with the previous champion). `scores`:
    a shadow's live comparison, for the audit row.

    Everything is checked first, under the tenant's lock, so a refused promotion changes nothing:
    the version is not the champion already, no run is still evaluating it, and its files are
    complete, unchanged and trained on the base model this service loads (verified_path)."""
    lock_tenant(session, adapter.tenant_id)
    session.refresh(adapter)
    if adapter.status == AdapterStatus.champion:
        raise Conflict(f"adapter version {adapter.version} is already the champion")
    _check_servable(session, settings, adapter)
    current = champion(session, adapter.tenant_id)
    running = shadow(session, adapter.tenant_id)
    if running is not None and running.id != adapter.id:
        reason_ended = f"shadow ended: version {adapter.version} was promoted by {actor} before it was decided"
        reject(session, running, actor=actor, reason=reason_ended)
    if current is not None:
        current.status = AdapterStatus.retired
        session.flush()  # the old champion steps down before the new one steps up
    adapter.status = AdapterStatus.champion
    adapter.promoted_at = utcnow()
    _audit(
        session,
        current,
        adapter,
        tenant_id=adapter.tenant_id,
        action="promote",
        actor=actor,
        reason=reason,
        scores=scores,
    )
    session.flush()
    return adapter


def start_shadow(session: Session, settings: Settings, adapter: Adapter, *, actor: str, reason: str) -> Adapter:
    """Put the adapter in shadow: it drafts every email beside the champion, its drafts stored and
    never shown, until its live scores decide (training/shadow.py). A shadow already running is
    rejected, superseded. Checked as a promotion is, under the tenant's lock, so a refused one
    changes nothing."""
    lock_tenant(session, adapter.tenant_id)
    session.refresh(adapter)
    if adapter.status in (AdapterStatus.champion, AdapterStatus.shadow):
        raise Conflict(f"adapter version {adapter.version} is already the {adapter.status}")
    _check_servable(session, settings, adapter)
    if (running := shadow(session, adapter.tenant_id)) is not None:
        reject(session, running, actor=actor, reason=f"superseded by v{adapter.version}")
    adapter.status = AdapterStatus.shadow
    current = champion(session, adapter.tenant_id)
    _audit(session, current, adapter, tenant_id=adapter.tenant_id, action="shadow", actor=actor, reason=reason)
    session.flush()
    return adapter


def reject(session: Session, adapter: Adapter, *, actor: str, reason: str, scores: dict | None = None) -> Adapter:
    adapter.status = AdapterStatus.rejected
    _audit(
        session, None, adapter, tenant_id=adapter.tenant_id, action="reject", actor=actor, reason=reason, scores=scores
    )
    session.flush()
    return adapter


def rollback(session: Session, tenant_id: int, *, actor: str, reason: str) -> Adapter | None:
    """Reject the champion and restore the champion before it (or the bare base model); a shadow
    compared with the rolled-back champion is rejected.

    Returns the new champion, or None when the tenant is back on the base model."""
    lock_tenant(session, tenant_id)
    current = champion(session, tenant_id)
    if current is None:
        raise Conflict("this tenant has no champion adapter to roll back")
    previous = session.scalar(
        select(Adapter)
        .where(
            Adapter.tenant_id == tenant_id,
            Adapter.status == AdapterStatus.retired,
            Adapter.promoted_at.is_not(None),
        )
        .order_by(Adapter.promoted_at.desc())
        .limit(1)
    )
    current.status = AdapterStatus.rejected  # rolled back: never restored by a later rollback
    if (running := shadow(session, tenant_id)) is not None:
        ended = f"shadow ended: the champion v{current.version} it was compared with was rolled back by {actor}"
        reject(session, running, actor=actor, reason=ended)
    session.flush()
    if previous is not None:
        previous.status = AdapterStatus.champion
    _audit(session, current, previous, tenant_id=tenant_id, action="rollback", actor=actor, reason=reason)
    session.flush()
    return previous


_verified: dict[tuple[int, str, str], Path] = {}


def drafting_adapter(session: Session, tenant_id: int) -> Adapter | None:
    """The version the tenant drafts with: its champion, else (a team with none of its own yet)
    its organization's champion, else None: the bare base model."""
    if (current := champion(session, tenant_id)) is not None:
        return current
    organization_id = session.scalar(select(Tenant.organization_id).where(Tenant.id == tenant_id))
    return champion(session, organization_id) if organization_id is not None else None


def champion_ref(session: Session, settings: Settings, tenant_id: int, base_fingerprint: str) -> AdapterRef | None:
    """The adapter the tenant drafts with (drafting_adapter) as the agent loads it, or None."""
    current = drafting_adapter(session, tenant_id)
    return serving_ref(session, settings, current, base_fingerprint) if current is not None else None


def served_scale(session: Session, adapter: Adapter) -> float:
    """The scale a version is served at: its tenant's setting when there is one, else the scale
    chosen for it on its validation slice."""
    override = session.get(Tenant, adapter.tenant_id).adapter_scale
    return override if override is not None else adapter.scale


def serving_ref(session: Session, settings: Settings, adapter: Adapter, base_fingerprint: str) -> AdapterRef:
    """The adapter as the agent loads it, at the scale it is served at (served_scale)."""
    return _ref(settings, adapter, base_fingerprint, served_scale(session, adapter))


def _ref(settings: Settings, adapter: Adapter, base_fingerprint: str, scale: float) -> AdapterRef:
    """Verified once per process (versions are immutable)."""
    key = (adapter.id, adapter.content_hash, base_fingerprint)
    if key not in _verified:
        _verified[key] = verified_path(settings, adapter, base_fingerprint)
    return AdapterRef(adapter.id, _verified[key], served_name(adapter, scale), scale)


_SERVED_NAME = re.compile(r"tenant-(\d{1,18})-v(\d{1,9})-([0-9a-f]{12})(?:-s(\d(?:\.\d{1,2})?))?")


def served_name(adapter: Adapter, scale: float) -> str:
    """The name a remote drafting server knows a version at a scale by: tenant, version, content
    hash and, other than 1, the scale (vLLM has no per-request scale: agent/remote.py publishes
    it folded into the adapter), so a name is never reused, not even by a registry rebuilt from
    scratch."""
    name = f"tenant-{adapter.tenant_id}-v{adapter.version:04d}-{adapter.content_hash[:12]}"
    return name if scale == 1.0 else f"{name}-s{scale:g}"


def ref_by_served_name(session: Session, settings: Settings, name: str, base_fingerprint: str) -> AdapterRef:
    """The version a served name stands for, at the name's scale (the front server resolved it),
    as the agent loads it; NotFound if there is none (or its files differ)."""
    match = _SERVED_NAME.fullmatch(name)
    if match is None:
        raise NotFound(f"no model {name!r}: adapters are served as tenant-<id>-v<NNNN>-<12 hex digits>[-s<scale>]")
    adapter = session.scalar(
        select(Adapter).where(Adapter.tenant_id == int(match[1]), Adapter.version == int(match[2]))
    )
    scale = float(match[4] or 1)
    if adapter is None or not adapter.content_hash.startswith(match[3]) or not 0 < scale <= MAX_ADAPTER_SCALE:
        raise NotFound(f"no model {name!r}")
    return _ref(settings, adapter, base_fingerprint, scale)
