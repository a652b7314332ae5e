"""Exports of a version trained by the real pipeline on the tiny model: each format loaded back by
the tools it is for, drafting as draftloop drafts the version, with a model card that tells the
truth about it."""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from agent.adapters import AdapterRef, attach, set_scale
from agent.base_model import EMBEDDED_GGUF_FILE, EMBEDDED_PACKAGE, fingerprint, model_id
from agent.drafting import Drafter
from agent.prompt import stop_token_ids
from agent.repetition import RepetitionGuard
from api.cli import app
from core.settings import get_settings
from feedback.models import Tenant
from tests.agent.engines import prompts
from tests.db import committing_sessions
from tests.factories import make_tenant, random_lora, store_version
from tests.live import REPO
from tests.training.helpers import add_corrections, start
from training import registry
from training.export import export_adapter, export_source, write_export
from training.gguf import gguf_file_name
from training.models import Adapter, DatasetSnapshot, ExportFormat, GgufDtype, RunStatus, TrainingRun
from training.pipeline import execute_run

LLAMA_PYTHON = REPO / ".venv-llama" / "bin" / "python"
# Logits of the GGUF loaded back by transformers against the merged model's: float32 is the same
# numbers (measured: equal); float16 rounds every weight (measured: 1.3e-3, on logits of about 1)
GGUF_TOLERANCE = {GgufDtype.float32: 1e-5, GgufDtype.float16: 2e-2}
SERVED_SCALE = 1.5  # the tenant's setting in the merged and GGUF tests: they must apply it


@pytest.fixture(scope="module")
def trained(postgres_engine, tiny_settings, tmp_path_factory):
    """A version trained, evaluated and promoted by the pipeline (with its run, its snapshots and
    its report), committed on PostgreSQL; and the settings whose registry holds it."""
    var_dir = tmp_path_factory.mktemp("export-var")
    settings = tiny_settings.model_copy(update={"var_dir": var_dir, "adapter_dir": var_dir / "adapters"})
    sessions = committing_sessions(postgres_engine)
    with sessions() as session:
        tenant = make_tenant(session, instructions="Answer as Marta.")
        add_corrections(session, tenant, 40)
    run_id = start(sessions, tenant)
    assert execute_run(run_id, settings, sessions=sessions, echo=lambda _: None) == RunStatus.promoted
    with sessions() as session:
        adapter = session.query(Adapter).filter_by(training_run_id=run_id).one()
    return settings, sessions, tenant, adapter


@pytest.fixture(scope="module")
def scaled(trained):
    """The version exported at SERVED_SCALE (the tenant's setting for the time of the export) as
    merged, and as GGUF in both dtypes."""
    settings, sessions, tenant, adapter = trained
    folder = settings.var_dir / "scaled"
    with sessions() as session:
        session.get(Tenant, tenant.id).adapter_scale = SERVED_SCALE
    try:
        with sessions() as session:
            source = export_source(session, settings, tenant.id, adapter.version)
    finally:
        with sessions() as session:
            session.get(Tenant, tenant.id).adapter_scale = None
    assert source.scale == SERVED_SCALE
    write_export(source, settings, ExportFormat.merged, folder / "merged")
    for dtype in GgufDtype:
        write_export(source, settings, ExportFormat.gguf, folder / str(dtype), dtype=dtype)
    return folder, source


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


def test_a_peft_export_is_the_registry_files_with_a_true_model_card(trained, tmp_path):
    settings, sessions, tenant, adapter = trained
    with sessions() as session:
        folder = export_adapter(session, settings, tenant.id, adapter.version, ExportFormat.peft, tmp_path / "peft")
        run = session.get(TrainingRun, adapter.training_run_id)
        snapshots = [session.get(DatasetSnapshot, i) for i in (run.train_snapshot_id, run.heldout_snapshot_id)]
    registry_dir = settings.adapter_dir / adapter.path
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", *registry.ADAPTER_FILES]
    for name in registry.ADAPTER_FILES:
        assert (folder / name).read_bytes() == (registry_dir / name).read_bytes()

    card = (folder / "README.md").read_text()
    assert f"base_model: {json.dumps(model_id(settings))}\nlibrary_name: peft" in card
    assert f"| base model fingerprint | `{fingerprint(settings.base_model)}` |" in card
    assert f"| adapter content hash | `{adapter.content_hash}` |" in card
    assert f"| served scale | {adapter.scale:g} (chosen on the validation slice) |" in card
    assert f"| version | {adapter.version} (champion) |" in card
    for snapshot in snapshots:
        row = f"| {snapshot.id} | {snapshot.split} | sft | {snapshot.row_count} | `{snapshot.content_hash}` |"
        assert row in card
    assert json.dumps(adapter.config, indent=2, sort_keys=True) in card  # the hyper-parameters
    candidate = run.report["summary"]["candidate"]
    scores = next(line for line in card.splitlines() if line.startswith("| candidate |"))
    assert f"| {candidate['nll']} |" in scores and f"| {candidate['chrf']} |" in scores
    assert f"Run {run.id}: **promoted**: {run.decision_reason}" in card
    assert f'"relative_improvement": {run.report["decision"]["relative_improvement"]}' in card


def test_vanilla_peft_loads_the_peft_export_and_drafts_as_the_engine_serves_the_version(
    trained, tiny_model, tiny_drafter, tmp_path
):
    settings, sessions, tenant, adapter = trained
    with sessions() as session:
        folder = export_adapter(session, settings, tenant.id, adapter.version, ExportFormat.peft, tmp_path / "peft")
        ref = registry.serving_ref(session, settings, adapter, tiny_model.fingerprint)
    batch, guard = prompts(tiny_model.tokenizer, 3), server_guard(settings)
    served = [
        s.result(timeout=60) for s in tiny_drafter.submit_many(batch, max_new_tokens=24, adapter=ref, guard=guard)
    ]

    base = AutoModelForCausalLM.from_pretrained(settings.base_model, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(folder)).eval()  # as vanilla PEFT loads any adapter
    set_scale(model, "default", ref.scale)
    options = decoding(guard, stop_token_ids(model.generation_config, tiny_model.tokenizer))
    assert [greedy(model, ids, **options) for ids in batch] == served
    with model.disable_adapter():
        assert [greedy(model, ids, **options) for ids in batch] != served


def server_guard(settings) -> RepetitionGuard:
    """The server's repetition guard without its cycle stop, which generate() does not have."""
    return RepetitionGuard(settings.repetition_penalty, settings.no_repeat_ngram_size)


def decoding(guard: RepetitionGuard, stop_ids: list[int]) -> dict:
    """generate()'s options for the engine's decoding with this guard."""
    return {
        "do_sample": False,
        "repetition_penalty": guard.repetition_penalty,
        "no_repeat_ngram_size": guard.no_repeat_ngram_size,
        "eos_token_id": stop_ids,
    }


def greedy(model, ids: list[int], max_new_tokens: int = 24, **options) -> list[int]:
    """One prompt's continuation by generate() (the model's generation config for what options leave)."""
    attention = torch.ones(1, len(ids), dtype=torch.long)
    out = model.generate(torch.tensor([ids]), attention_mask=attention, max_new_tokens=max_new_tokens, **options)
    return out[0, len(ids) :].tolist()


def test_a_merged_export_drafts_as_the_adapter_on_the_base_at_its_served_scale(
    trained, scaled, tiny_model, tiny_drafter
):
    """generate() on the merged folder, with its generation config, gives the tokens of the adapter
    on the base through PEFT at the served scale and of the engine with the server's guard."""
    settings, _, _, _ = trained
    folder, source = scaled
    merged_dir = folder / "merged"
    assert {p.name for p in merged_dir.iterdir()} >= {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
    }
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template == tiny_model.tokenizer.chat_template
    assert "at its served scale 1.5" in (merged_dir / "README.md").read_text()

    ref = AdapterRef(source.adapter_id, source.adapter_dir, scale=source.scale)
    peft = attach(AutoModelForCausalLM.from_pretrained(settings.base_model).eval(), ref)
    batch = prompts(tokenizer, 3)
    for ids in batch:
        assert torch.allclose(logits(merged, ids), logits(peft, ids), atol=1e-5)
    guard = server_guard(settings)
    from_config = [greedy(merged, ids) for ids in batch]  # the exported generation config decides
    assert from_config == [
        greedy(peft, ids, **decoding(guard, stop_token_ids(peft.generation_config, tokenizer))) for ids in batch
    ]
    served = tiny_drafter.submit_many(batch, max_new_tokens=24, adapter=ref, guard=guard)  # the serving engine
    assert from_config == [s.result(timeout=60) for s in served]


@pytest.mark.parametrize("dtype", list(GgufDtype))
def test_a_gguf_export_loads_back_in_transformers_within_the_tolerance(scaled, tiny_model, dtype):
    folder, source = scaled
    gguf_dir = folder / str(dtype)
    gguf_name = gguf_file_name(source.name, dtype)
    assert sorted(p.name for p in gguf_dir.iterdir()) == ["Modelfile", "README.md", gguf_name]
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(folder / "merged").eval()
    batch = prompts(tiny_model.tokenizer, 3)
    worst = max((logits(loaded, ids) - logits(merged, ids)).abs().max().item() for ids in batch)
    assert worst <= GGUF_TOLERANCE[dtype], worst
    print(f"GGUF {dtype}: largest logit difference {worst:.2e}")


def test_a_gguf_export_carries_the_tokenizer_the_chat_template_and_a_modelfile(scaled, tiny_model):
    folder, source = scaled
    gguf_dir, gguf_name = folder / "float16", gguf_file_name(source.name, GgufDtype.float16)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    for ids in prompts(tiny_model.tokenizer, 3):
        text = tiny_model.tokenizer.decode(ids)
        assert tokenizer(text, add_special_tokens=False).input_ids == ids

    reader = GGUFReader(gguf_dir / gguf_name)
    assert _field(reader, "tokenizer.chat_template") == tiny_model.tokenizer.chat_template
    # The vocabulary as the GGUF of the embedded model states it (the tiny model shares its tokenizer)
    package = importlib.util.find_spec(EMBEDDED_PACKAGE).submodule_search_locations[0]
    shipped = GGUFReader(Path(package) / EMBEDDED_GGUF_FILE)
    for key in ("pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id"):
        assert _field(reader, f"tokenizer.ggml.{key}") == _field(shipped, f"tokenizer.ggml.{key}"), key
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False

    modelfile = (gguf_dir / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{gguf_name}\n") and 'SYSTEM """Answer as Marta."""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER temperature 0" in modelfile


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def test_llama_cpp_decodes_from_the_gguf_export_the_tokens_the_engine_drafts(
    embedded_model, model_settings, pg_session, tmp_path
):
    """llama.cpp itself (its Python binding, `make llama-cpp`), on a version of the embedded model:
    the prompts tokenized to the same ids, and greedily the tokens the serving engine drafts with
    the version, 32 of each, from the float16 GGUF (the default)."""
    if not LLAMA_PYTHON.exists():
        raise RuntimeError(f"{LLAMA_PYTHON} is missing: run `make llama-cpp` (llama.cpp's Python binding)")
    settings = model_settings.model_copy(update={"adapter_dir": tmp_path / "registry"})
    tenant = make_tenant(pg_session)
    trained = random_lora(embedded_model.model.config, tmp_path / "trained", rank=8, seed=3, std=0.02)
    adapter = store_version(pg_session, settings, tenant.id, trained)
    folder = export_adapter(pg_session, settings, tenant.id, adapter.version, ExportFormat.gguf, tmp_path / "gguf")
    drafter = Drafter.local(embedded_model, settings)
    batch = prompts(embedded_model.tokenizer, 3)
    try:
        ref = registry.serving_ref(pg_session, settings, adapter, drafter.fingerprint)
        streams = drafter.submit_many(batch, max_new_tokens=32, adapter=ref, guard=RepetitionGuard())
        expected = [s.result(timeout=300) for s in streams]
    finally:
        drafter.close()
    job = {
        "prompts": batch,
        "texts": [embedded_model.tokenizer.decode(ids) for ids in batch],
        "stop": stop_token_ids(embedded_model.model.generation_config, embedded_model.tokenizer),
    }
    path = folder / gguf_file_name(f"{tenant.slug}-v0001", GgufDtype.float16)
    command = [str(LLAMA_PYTHON), "-c", LLAMA_SCRIPT, str(path), json.dumps(job)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    decoded = json.loads(result.stdout.splitlines()[-1])
    assert decoded["tokenized"] == batch
    assert decoded["tokens"] == expected


# Run by .venv-llama's Python: tokenize the texts, then decode each prompt greedily up to a stop
# token or 32 tokens (no repetition penalty: llama-cpp-python's leaves the prompt out of it)
LLAMA_SCRIPT = """
import json, sys
from llama_cpp import Llama
job = json.loads(sys.argv[2])
model = Llama(model_path=sys.argv[1], n_ctx=1024, n_threads=2, verbose=False)
tokenized = [model.tokenize(text.encode(), add_bos=False, special=True) for text in job["texts"]]
tokens = []
for prompt in job["prompts"]:
    out = []
    for token in model.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(token)
        if token in job["stop"] or len(out) == 32:
            break
    tokens.append(out)
print(json.dumps({"tokenized": tokenized, "tokens": tokens}))
"""


def test_the_cli_exports_a_version_into_a_new_folder_only(trained, tmp_path, monkeypatch):
    settings, _, tenant, adapter = trained
    monkeypatch.setenv("DRAFTLOOP_BASE_MODEL", settings.base_model)
    monkeypatch.setenv("DRAFTLOOP_VAR_DIR", str(settings.var_dir))
    monkeypatch.setenv("DRAFTLOOP_ADAPTER_DIR", str(settings.adapter_dir))
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        out = tmp_path / "export"
        args = ["adapters", "export", "--tenant", tenant.slug, "--version", str(adapter.version), "--format"]
        done = runner.invoke(app, [*args, "peft", "--out", str(out)])
        assert done.exit_code == 0, done.output
        assert f"v{adapter.version} (peft) -> {out}: README.md, adapter_config.json" in done.output
        again = runner.invoke(app, [*args, "peft", "--out", str(out)])
        assert again.exit_code == 1 and "exists and is not an empty folder" in again.output
        assert sorted(p.name for p in out.iterdir()) == ["README.md", *registry.ADAPTER_FILES]  # untouched
        missing = runner.invoke(app, [*args[:5], "99", "--format", "peft", "--out", str(tmp_path / "none")])
        assert missing.exit_code == 1 and "no adapter version 99" in missing.output
        assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".*"))  # no temporary folder left
    finally:
        get_settings.cache_clear()


def test_a_tampered_version_is_not_exported(trained, tmp_path):
    settings, sessions, tenant, adapter = trained
    copy = tmp_path / "registry"
    shutil.copytree(settings.adapter_dir, copy)
    (copy / adapter.path / "adapter_model.safetensors").write_bytes(b"changed")
    with sessions() as session, pytest.raises(registry.AdapterInvalid, match="content hash"):
        export_adapter(
            session,
            settings.model_copy(update={"adapter_dir": copy}),
            tenant.id,
            adapter.version,
            ExportFormat.peft,
            tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()
