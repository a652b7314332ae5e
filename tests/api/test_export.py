"""GET /v1/adapters/{version}/export: the export of a version of the key's tenant, streamed as an
archive whose temporary folder is gone once it is sent."""

import io
import tarfile

import pytest

from core.settings import get_settings
from tests.factories import random_lora, store_version
from training import registry
from training.models import Adapter


@pytest.fixture
def export_settings(tiny_settings, tmp_path):
    return tiny_settings.model_copy(update={"var_dir": tmp_path / "var", "adapter_dir": tmp_path / "registry"})


@pytest.fixture
def version(session, keys, export_settings, tiny_model, tmp_path) -> Adapter:
    """A version of the keys' tenant, committed for the app's requests."""
    trained = random_lora(tiny_model.model.config, tmp_path / "trained", rank=4)
    adapter = store_version(session, export_settings, keys.tenant.id, trained)
    session.commit()
    return adapter


def get_export(client, settings, version: int, headers, **params):
    client.app.dependency_overrides[get_settings] = lambda: settings
    return client.get(f"/v1/adapters/{version}/export", params=params, headers=headers)


def members(response) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers()}


def test_a_peft_export_is_a_tar_gz_of_the_registry_files_and_the_model_card(client, keys, export_settings, version):
    response = get_export(client, export_settings, version.version, keys.admin)
    assert response.status_code == 200, response.text
    name = f"{keys.tenant.slug}-v0001-peft"
    assert response.headers["content-type"] == "application/gzip"
    assert response.headers["content-disposition"] == f'attachment; filename="{name}.tar.gz"'
    files = members(response)
    assert sorted(files) == [f"{name}/README.md", *(f"{name}/{file}" for file in registry.ADAPTER_FILES)]
    for file in registry.ADAPTER_FILES:
        assert files[f"{name}/{file}"] == (export_settings.adapter_dir / version.path / file).read_bytes()
    assert f"`{version.content_hash}`" in files[f"{name}/README.md"].decode()
    assert list((export_settings.var_dir / "exports").iterdir()) == []  # removed once streamed


def test_a_gguf_export_is_a_tar_of_the_file_and_its_modelfile(client, keys, export_settings, version):
    response = get_export(client, export_settings, version.version, keys.admin, format="gguf", dtype="float32")
    assert response.status_code == 200, response.text
    name = f"{keys.tenant.slug}-v0001-gguf"
    assert response.headers["content-type"] == "application/x-tar"
    files = members(response)
    gguf_file = f"{name}/{keys.tenant.slug}-v0001-f32.gguf"
    assert sorted(files) == [f"{name}/Modelfile", f"{name}/README.md", gguf_file]
    assert files[gguf_file][:4] == b"GGUF"
    assert list((export_settings.var_dir / "exports").iterdir()) == []


def test_another_tenants_version_and_other_roles_are_refused(
    client, keys, other_keys, export_settings, version, tiny_model
):
    assert get_export(client, export_settings, version.version, other_keys.admin).status_code == 404
    assert get_export(client, export_settings, version.version + 1, keys.admin).status_code == 404
    assert get_export(client, export_settings, version.version, keys.reviewer).status_code == 403
    bad = get_export(client, export_settings, version.version, keys.admin, format="onnx")
    assert bad.status_code == 422


def test_one_model_export_at_a_time(client, keys, export_settings, version):
    from api.routes.training import _MODEL_EXPORTS

    assert _MODEL_EXPORTS.acquire(blocking=False)
    try:
        busy = get_export(client, export_settings, version.version, keys.admin, format="merged")
        assert busy.status_code == 503 and busy.headers["retry-after"] == "30"
        assert get_export(client, export_settings, version.version, keys.admin).status_code == 200  # peft: no model
    finally:
        _MODEL_EXPORTS.release()
