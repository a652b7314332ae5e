import json
import shutil
import uuid

import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy.exc import IntegrityError

from agent.base_model import fingerprint
from core.errors import Conflict
from core.settings import Settings
from tests.factories import make_tenant, store_version
from training import registry
from training.models import Adapter, AdapterEvent, AdapterStatus, RunStatus
from training.registry import AdapterInvalid
from training.runs import create_run


def trained_dir(tmp_path, rank=8, peft_type="LORA"):
    folder = tmp_path / f"trained-{uuid.uuid4().hex}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": rank}))
    save_file({"lora_A": torch.randn(rank, 4)}, str(folder / "adapter_model.safetensors"))
    (folder / "README.md").write_text("not copied")
    return folder


@pytest.fixture
def settings(tmp_path, tiny_base_dir):
    """A registry of the test's own, for adapters of the tiny base model."""
    return Settings(base_model=str(tiny_base_dir), adapter_dir=tmp_path / "registry")


def store(session, settings, tenant, tmp_path, **kwargs):
    return registry.store_candidate(
        session,
        settings,
        tenant_id=tenant.id,
        trained_dir=trained_dir(tmp_path, **kwargs),
        base_model="tiny",
        base_fingerprint=fingerprint(settings.base_model),
        config={"rank": 8},
        train_snapshot_id=None,
        training_run_id=None,
    )


def champions(session, tenant):
    return [a.version for a in registry.list_adapters(session, tenant.id) if a.status == AdapterStatus.champion]


def test_a_stored_version_is_immutable_and_verified(session, settings, tmp_path):
    tenant = make_tenant(session)
    adapter = store(session, settings, tenant, tmp_path)
    folder = registry.verified_path(settings, adapter, fingerprint(settings.base_model))
    assert adapter.version == 1 and adapter.status == AdapterStatus.candidate
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert adapter.content_hash == registry.content_hash(folder) and adapter.size_bytes > 0
    assert store(session, settings, tenant, tmp_path).version == 2


def test_promotion_and_rollback_keep_exactly_one_champion(session, settings, tmp_path):
    tenant = make_tenant(session)
    v1, v2, v3 = (store(session, settings, tenant, tmp_path) for _ in range(3))
    registry.promote(session, settings, v1, actor="op", reason="first")
    registry.promote(session, settings, v2, actor="op", reason="better")
    registry.promote(session, settings, v3, actor="op", reason="better still")
    assert champions(session, tenant) == [3] and v1.status == v2.status == AdapterStatus.retired

    assert registry.rollback(session, tenant.id, actor="op", reason="v3 drafts are worse").version == 2
    assert champions(session, tenant) == [2] and v3.status == AdapterStatus.rejected
    assert registry.rollback(session, tenant.id, actor="op", reason="again").version == 1
    assert registry.rollback(session, tenant.id, actor="op", reason="back to base") is None
    assert champions(session, tenant) == []

    events = session.query(AdapterEvent).filter_by(tenant_id=tenant.id).order_by(AdapterEvent.id).all()
    assert [e.action for e in events] == ["promote", "promote", "promote", "rollback", "rollback", "rollback"]
    assert (events[3].from_adapter_id, events[3].to_adapter_id, events[3].actor) == (v3.id, v2.id, "op")


def test_the_database_allows_one_champion_per_tenant(session, settings, tmp_path):
    tenant = make_tenant(session)
    v1, v2 = store(session, settings, tenant, tmp_path), store(session, settings, tenant, tmp_path)
    registry.promote(session, settings, v1, actor="op", reason="first")
    with pytest.raises(IntegrityError), session.begin_nested():
        v2.status = AdapterStatus.champion
        session.flush()


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda f: (f / "adapter_model.safetensors").write_bytes(b"changed"), "content hash"),
        (lambda f: (f / "adapter_model.bin").write_bytes(b"pickle"), "expected exactly"),
        (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING", "r": 8}'), "only LoRA"),
        (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4096}'), "rank"),
        (shutil.rmtree, "missing"),
    ],
)
def test_a_tampered_adapter_is_refused(session, settings, tmp_path, tamper, message):
    tenant = make_tenant(session)
    adapter = store(session, settings, tenant, tmp_path)
    tamper(settings.adapter_dir.resolve() / adapter.path)
    with pytest.raises(AdapterInvalid, match=message):
        registry.verified_path(settings, adapter, fingerprint(settings.base_model))


def test_paths_outside_the_registry_and_other_bases_are_refused(session, settings, tmp_path):
    tenant = make_tenant(session)
    adapter = store(session, settings, tenant, tmp_path)
    with pytest.raises(AdapterInvalid, match="another base model"):
        registry.verified_path(settings, adapter, "0" * 64)
    adapter.path = "../outside"
    with pytest.raises(AdapterInvalid, match="outside the registry"):
        registry.verified_path(settings, adapter, fingerprint(settings.base_model))
    link = settings.adapter_dir.resolve() / "link"
    link.symlink_to(tmp_path)
    adapter.path = "link"
    with pytest.raises(AdapterInvalid, match="outside the registry"):
        registry.verified_path(settings, adapter, fingerprint(settings.base_model))


def test_a_non_lora_adapter_is_not_stored(session, settings, tmp_path):
    tenant = make_tenant(session)
    with pytest.raises(AdapterInvalid, match="only LoRA"):
        store(session, settings, tenant, tmp_path, peft_type="IA3")
    assert session.query(Adapter).filter_by(tenant_id=tenant.id).count() == 0
    assert not any(p.name.startswith("v") for p in (settings.adapter_dir.resolve() / f"tenant-{tenant.id}").iterdir())


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda f: (f / "adapter_model.safetensors").write_bytes(b"changed"), "content hash"),
        (shutil.rmtree, "missing"),
    ],
)
def test_promotion_checks_the_files_before_it_changes_the_champion(session, settings, tmp_path, tamper, message):
    tenant = make_tenant(session)
    v1, v2 = store(session, settings, tenant, tmp_path), store(session, settings, tenant, tmp_path)
    registry.promote(session, settings, v1, actor="op", reason="first")
    tamper(settings.adapter_dir.resolve() / v2.path)
    with pytest.raises(AdapterInvalid, match=message):
        registry.promote(session, settings, v2, actor="op", reason="by hand")
    assert champions(session, tenant) == [1] and v2.status == AdapterStatus.candidate


def test_promotion_refuses_another_base_model_and_a_candidate_still_being_evaluated(session, settings, tmp_path):
    tenant = make_tenant(session)
    other_base = store(session, settings, tenant, tmp_path)
    other_base.base_model_fingerprint = "0" * 64
    with pytest.raises(AdapterInvalid, match="another base model"):
        registry.promote(session, settings, other_base, actor="op", reason="by hand")
    run = create_run(session, tenant.id, trigger="api", requested_by="op")
    run.status = RunStatus.evaluating
    evaluated = store(session, settings, tenant, tmp_path)
    evaluated.training_run_id = run.id
    with pytest.raises(Conflict, match=f"still being evaluated by run {run.id}"):
        registry.promote(session, settings, evaluated, actor="op", reason="by hand")
    assert champions(session, tenant) == []


def test_a_folder_left_by_a_writer_that_died_before_its_commit_is_set_aside(session, settings, tmp_path):
    tenant = make_tenant(session)
    orphan = settings.adapter_dir.resolve() / f"tenant-{tenant.id}" / "v0001"
    orphan.mkdir(parents=True)
    (orphan / "adapter_config.json").write_text("{}")  # renamed into place, never committed
    adapter = store(session, settings, tenant, tmp_path)
    assert adapter.version == 1
    assert registry.verified_path(settings, adapter, fingerprint(settings.base_model)) == orphan
    aside = [p.name for p in orphan.parent.iterdir() if p.name.startswith(".orphan-v0001-")]
    assert len(aside) == 1 and (orphan.parent / aside[0] / "adapter_config.json").read_text() == "{}"


def test_writers_on_several_machines_share_one_registry(postgres_engine, tiny_base_dir, tmp_path):
    """Processes storing versions of one tenant at once into one registry folder (as workers on
    several machines do on a shared filesystem): each gets its own version, whole and verified."""
    from concurrent.futures import ProcessPoolExecutor

    from sqlalchemy.orm import Session

    settings = Settings(base_model=str(tiny_base_dir), adapter_dir=tmp_path / "shared-registry")
    with Session(postgres_engine) as session:
        tenant_id = make_tenant(session).id
        session.commit()
    folders = [trained_dir(tmp_path) for _ in range(6)]
    url = postgres_engine.url.render_as_string(hide_password=False)
    with ProcessPoolExecutor(3) as pool:
        versions = list(pool.map(_store_in_a_process, [(url, settings, tenant_id, f) for f in folders]))
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]
    with Session(postgres_engine) as session:
        for adapter in registry.list_adapters(session, tenant_id):
            registry.verified_path(settings, adapter, fingerprint(settings.base_model))
            assert adapter.content_hash == registry.content_hash(folders[versions.index(adapter.version)])


def _store_in_a_process(job) -> int:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    url, settings, tenant_id, folder = job
    engine = create_engine(url)
    with Session(engine) as session:
        adapter = store_version(session, settings, tenant_id, folder)
        session.commit()
        version = adapter.version
    engine.dispose()
    return version
