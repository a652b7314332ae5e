"""Exports of a tenant's adapter version, to run it elsewhere.

Three formats, each a folder with a model card (README.md) that says what the version is and
how it was made (model_card):

- `peft`: the registry's two PEFT files as they are (vanilla PEFT and vLLM load them);
- `merged`: the base model with the adapter merged into its weights at the scale the version is
  served at, a transformers folder in safetensors with the tokenizer, its chat template and a
  generation config that decodes as draftloop drafts;
- `gguf`: the same merged weights as one GGUF file for llama.cpp and Ollama (float16 or float32),
  the tokenizer and chat template in its metadata, with an Ollama `Modelfile` beside it
  (training/gguf.py, imported only to write it).

An export is written to a temporary folder beside its destination and renamed into place, so a
destination holds a whole export or nothing. The database is read first (export_source) and
the heavy work needs no session (write_export), so a server holds no connection meanwhile."""

import json
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlalchemy.orm import Session
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from agent.adapters import AdapterRef, attach
from agent.base_model import fingerprint, model_id, model_source
from agent.prompt import DEFAULT_INSTRUCTIONS, pad_token_id, stop_token_ids
from core.errors import Conflict, Invalid
from core.settings import Settings
from feedback.models import Tenant
from training import registry
from training.models import Adapter, DatasetSnapshot, ExportFormat, GgufDtype, TrainingRun

# float16 by default: half the file, computed natively by llama.cpp and Ollama on CPUs and GPUs,
# and the embedded base's weights were 4-bit before they were dequantized, so float16 loses
# nothing they had; float32 keeps the merged weights bit for bit.
DEFAULT_GGUF_DTYPE = GgufDtype.float16
CARD = "README.md"
STALE_EXPORT_S = 24 * 3600  # an export folder left this long under <var_dir>/exports is removed


@dataclass(frozen=True)
class ExportSource:
    """One verified version and what its exports say about it, read from the database."""

    name: str  # <tenant slug>-v<NNNN>
    adapter_dir: Path  # the registry's folder, verified
    adapter_id: int
    base_model: str  # its id, as the registry records it
    base_source: str  # its folder
    scale: float  # the scale it is served at
    instructions: str  # the system prompt the tenant drafts with
    card: str  # the model card's facts (model_card), the same in every format


def export_adapter(
    session: Session,
    settings: Settings,
    tenant_id: int,
    version: int,
    fmt: ExportFormat,
    out: Path,
    *,
    dtype: GgufDtype = DEFAULT_GGUF_DTYPE,
) -> Path:
    """Export one of the tenant's versions to the folder `out` (absent or empty); NotFound for a
    version the tenant does not have, AdapterInvalid for files that fail the registry's checks."""
    return write_export(export_source(session, settings, tenant_id, version), settings, fmt, out, dtype=dtype)


def export_source(session: Session, settings: Settings, tenant_id: int, version: int) -> ExportSource:
    """The tenant's version, its files verified as the agent verifies them before serving
    (inside the registry, the two files, the content hash, trained on the base model loaded)."""
    adapter = registry.get_adapter(session, tenant_id, version=version)
    source = model_source(settings)
    base_fingerprint = fingerprint(source)
    folder = registry.verified_path(settings, adapter, base_fingerprint)
    tenant, base_model = session.get(Tenant, tenant_id), model_id(settings)
    return ExportSource(
        name=f"{tenant.slug}-v{adapter.version:04d}",
        adapter_dir=folder,
        adapter_id=adapter.id,
        base_model=base_model,
        base_source=source,
        scale=registry.served_scale(session, adapter),
        instructions=tenant.instructions.strip() or DEFAULT_INSTRUCTIONS,
        card=model_card(session, adapter, base_model=base_model, base_fingerprint=base_fingerprint),
    )


def write_export(
    source: ExportSource, settings: Settings, fmt: ExportFormat, out: Path, *, dtype: GgufDtype = DEFAULT_GGUF_DTYPE
) -> Path:
    """Write the export into a temporary folder beside `out`, then rename it into place."""
    out = Path(out).resolve()
    _check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (scratch / CARD).write_text(_readme(source, fmt, dtype))
        if fmt == ExportFormat.peft:
            for name in registry.ADAPTER_FILES:
                shutil.copyfile(source.adapter_dir / name, scratch / name)
        elif fmt == ExportFormat.merged:
            save_merged(merged_model(source), settings, scratch)
        else:
            from training.gguf import write_gguf_folder  # the gguf package: loaded by this format alone

            write_gguf_folder(merged_model(source), scratch, source.name, source.instructions, settings, dtype=dtype)
        os.chmod(scratch, 0o755)  # mkdtemp makes it private
        try:
            os.rename(scratch, out)  # replaces an empty folder, atomically
        except OSError as error:
            raise Conflict(f"{out} was filled while the export was written; nothing was replaced") from error
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return out


def _check_destination(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Invalid(f"{out} exists and is not an empty folder: export into a new or empty folder")


def _readme(source: ExportSource, fmt: ExportFormat, dtype: GgufDtype) -> str:
    """The model card with what this folder holds on top, under Hugging Face's card metadata."""
    scale = f"at its served scale {source.scale:g}"
    holds = {
        ExportFormat.peft: (
            f"The adapter's PEFT files as the registry holds them, byte for byte. Loaded as they are, they apply it "
            f"at scale 1; it is served at {source.scale:g} (PEFT: `LoraLayer.set_scale`; vLLM: multiply "
            "`lora_alpha` by it)."
        ),
        ExportFormat.merged: f"The base model with the adapter merged into its weights {scale} (transformers).",
        ExportFormat.gguf: f"The merged model ({scale}) as one GGUF file in {dtype}, with an Ollama `Modelfile`.",
    }[fmt]
    library = {ExportFormat.peft: "peft", ExportFormat.merged: "transformers", ExportFormat.gguf: "gguf"}[fmt]
    return (
        f"---\nbase_model: {json.dumps(source.base_model)}\nlibrary_name: {library}\ntags: [lora, draftloop]\n---\n"
        f"# {source.name} ({fmt})\n\n{holds}\n\n{source.card}"
    )


def model_card(session: Session, adapter: Adapter, *, base_model: str, base_fingerprint: str) -> str:
    """README.md of an export: the base model and its fingerprint, the dataset snapshots' content
    hashes, the hyper-parameters, the held-out scores and the gate's decision, the served scale
    (markdown; the export puts what its folder holds on top)."""
    run = session.get(TrainingRun, adapter.training_run_id) if adapter.training_run_id else None
    report = (run.report if run else None) or {}
    tenant = session.get(Tenant, adapter.tenant_id)
    override = tenant.adapter_scale is not None
    scale = registry.served_scale(session, adapter)
    lines = [
        "| | |",
        "|---|---|",
        f"| tenant | {tenant.slug} ({tenant.name}) |",
        f"| version | {adapter.version} ({adapter.status}) |",
        f"| adapter content hash | `{adapter.content_hash}` |",
        f"| base model | {base_model} |",
        f"| base model fingerprint | `{base_fingerprint}` |",
        f"| served scale | {scale:g} ({'the tenant setting' if override else 'chosen on the validation slice'}) |",
        f"| training run | {run.id if run else 'none recorded'} |",
        f"| created | {adapter.created_at:%Y-%m-%d %H:%M} UTC |",
        "",
        "## Datasets",
        "",
        "| snapshot | split | kind | rows | content hash |",
        "|---|---|---|---|---|",
    ]
    snapshot_ids = [run.train_snapshot_id, run.heldout_snapshot_id, run.preference_snapshot_id] if run else []
    for snapshot in (session.get(DatasetSnapshot, i) for i in snapshot_ids if i is not None):
        lines.append(
            f"| {snapshot.id} | {snapshot.split} | {snapshot.kind} | {snapshot.row_count} | `{snapshot.content_hash}` |"
        )
    if adapter.composition:
        parents = " + ".join(
            f"{p['weight']:g} x {p['role']} (tenant {p['tenant_id']}) v{p['version']} at scale {p['scale']:g}"
            for p in adapter.composition["parents"]
        )
        lines += ["", "## Combined from", "", f"{parents}, method {adapter.composition['method']}."]
    lines += ["", "## Hyper-parameters", "", "```json", json.dumps(adapter.config, indent=2, sort_keys=True), "```"]
    if selection := (report.get("training") or {}).get("selection"):
        lines += ["", "What training tried and kept on its validation slice:", ""]
        lines += ["```json", json.dumps(selection, indent=2, sort_keys=True), "```"]
    lines += ["", "## Held-out scores", ""]
    if summary := report.get("summary"):
        names = sorted({score for scores in summary.values() for score in scores})
        lines += [f"| model | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
        for model, scores in summary.items():
            lines.append(f"| {model} | {' | '.join(str(scores.get(name, '')) for name in names)} |")
        examples, drafted = report.get("heldout_examples"), report.get("drafted_examples")
        lines += ["", f"On {examples} held-out examples, {drafted} of them drafted."]
    else:
        lines.append("None recorded.")
    lines += ["", "## The gate's decision", ""]
    if run is not None and run.decision_reason:
        lines.append(f"Run {run.id}: **{run.status}**: {run.decision_reason}")
        if decision := report.get("decision"):
            lines += ["", "```json", json.dumps(decision, indent=2, sort_keys=True), "```"]
    else:
        lines.append("None recorded.")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Merged:
    model: PreTrainedModel  # float32
    tokenizer: PreTrainedTokenizerBase
    stored_dtype: torch.dtype  # the base's weights on disk


def merged_model(source: ExportSource) -> Merged:
    """The base in float32 with the adapter attached at its served scale (as evaluation attaches
    it) and merged into its weights by PEFT; and the base's tokenizer."""
    base = AutoModelForCausalLM.from_pretrained(source.base_source, dtype="auto", local_files_only=True)
    stored_dtype = base.dtype
    model = attach(base.float(), AdapterRef(source.adapter_id, source.adapter_dir, scale=source.scale))
    tokenizer = AutoTokenizer.from_pretrained(source.base_source, local_files_only=True)
    return Merged(model.merge_and_unload().eval(), tokenizer, stored_dtype)


def save_merged(merged: Merged, settings: Settings, folder: Path) -> None:
    """A transformers folder in the dtype the base is stored in: safetensors, the tokenizer with
    its chat template, and a generation config that stops where draftloop stops (the end of the
    turn) with the server's repetition guard, greedy."""
    model, tokenizer = merged.model, merged.tokenizer
    config = model.generation_config
    config.eos_token_id = stop_token_ids(config, tokenizer)
    config.pad_token_id = pad_token_id(tokenizer)
    config.do_sample = False
    config.max_new_tokens = settings.max_new_tokens
    config.repetition_penalty = settings.repetition_penalty
    config.no_repeat_ngram_size = settings.no_repeat_ngram_size
    model.to(merged.stored_dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def export_archive(
    source: ExportSource, settings: Settings, fmt: ExportFormat, *, dtype: GgufDtype = DEFAULT_GGUF_DTYPE
) -> tuple[str, Iterator[bytes]]:
    """An archive's file name and its bytes: the export as a tar, gzip-compressed for peft (the
    weights of the others barely compress). The export is written first, in a folder of its own
    under <var_dir>/exports; the stream removes it when it ends or is dropped, and each export
    removes what a stream never started or a killed server left there (a day old)."""
    exports = settings.var_dir.resolve() / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    for stale in exports.iterdir():
        if time.time() - stale.stat().st_mtime > STALE_EXPORT_S:
            shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{source.name}-", dir=exports))
    try:
        folder = write_export(source, settings, fmt, scratch / f"{source.name}-{fmt}", dtype=dtype)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    compress = fmt == ExportFormat.peft

    def chunks() -> Iterator[bytes]:
        try:
            yield from archive(folder, compress=compress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    return f"{folder.name}.tar{'.gz' if compress else ''}", chunks()


def archive(folder: Path, *, compress: bool) -> Iterator[bytes]:
    """The folder as a tar stream (gzip-compressed with compress), its files under the folder's
    name, produced a chunk at a time: a merged model is never held in memory or copied to disk."""
    compressor = zlib.compressobj(wbits=31) if compress else None  # 31: the gzip container
    for chunk in _tar_chunks(folder):
        if compressor is None:
            yield chunk
        elif packed := compressor.compress(chunk):
            yield packed
    if compressor is not None:
        yield compressor.flush()


def _tar_chunks(folder: Path) -> Iterator[bytes]:
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        info = tarfile.TarInfo(f"{folder.name}/{path.name}")
        stat = path.stat()
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                yield chunk
        yield b"\0" * (-info.size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)  # the end of the archive
