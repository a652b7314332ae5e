"""The remote drafting backend: drafts decoded by an OpenAI-compatible multi-LoRA server, vLLM
(`vllm serve BASE --enable-lora ...`) or another draftloop process (`POST /v1/completions`,
api/routes/serving.py), instead of the in-process engine.

Each draft is one streamed `/v1/completions` request carrying the prompt as token ids (the
prompt builder stays here, so both backends draft from the same ids), greedy decoding, the stop
tokens and the repetition penalties, and `model` = the adapter's immutable name (tenant,
version and content hash: a name is never reused, so no server ever serves a stale copy).
Tokens come back as they are decoded and end by the engine's rule (`stream.emit`), so the
cycle stop works here too: a draft that loops is cut and its request closed, which aborts it
on the server.

Adapters are published for the server before their first use, into `publish_dir`, one folder
per name in the layout vLLM's filesystem LoRA resolver reads (`VLLM_LORA_RESOLVER_CACHE_DIR`);
with `load_route`, the server is also told to load the folder through its load-adapter route.
A draftloop server reads the shared registry itself and needs neither.

vLLM has no per-request LoRA scale: an adapter served at a scale other than 1 is published with
the scale folded into its `lora_alpha` (vLLM's scaling is alpha / r, as PEFT's), under a name
that carries the scale; a draftloop server reads the scale from the name."""

import json
import logging
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from agent.adapters import AdapterRef
from agent.base_model import publish_dir as rename_into_place
from agent.repetition import RepetitionGuard
from agent.stream import TokenStream, emit
from core.errors import Overloaded, UpstreamFailed

log = logging.getLogger(__name__)

UNREACHABLE_RETRY_S = 5  # Retry-After when the server cannot be reached at all


class RemoteBackend:
    """Drafts through a remote server; at most `max_in_flight` at once, past that `Overloaded`."""

    def __init__(
        self,
        *,
        url: str,
        model: str,
        api_key: str,
        base_path: str,
        base_fingerprint: str,
        stop_ids: list[int],
        max_in_flight: int,
        publish_dir: Path | None,
        load_route: bool,
        timeout_s: float,
    ):
        self.name = f"remote {url}"
        self.url, self.model, self.stop_ids = url, model, set(stop_ids)
        self.base_path, self.base_fingerprint = base_path, base_fingerprint
        self.publish_dir, self.load_route = publish_dir, load_route
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight),
        )
        self._pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="remote-draft")
        self._max_in_flight, self._in_flight = max_in_flight, 0
        self._lock = threading.Lock()
        self._offered: set[str] = set()  # adapter names published (and loaded) for the server

    def submit(
        self,
        prompt: list[int],
        max_new_tokens: int,
        adapter: AdapterRef | None,
        guard: RepetitionGuard,
        on_finish=None,
    ) -> TokenStream:
        if not prompt:
            raise ValueError("the prompt is empty")
        with self._lock:
            if self._in_flight >= self._max_in_flight:
                raise Overloaded(
                    f"{self._in_flight} drafts are in progress on the drafting server; retry in a moment",
                    retry_after_s=1,
                )
            self._in_flight += 1
        stream = TokenStream(on_finish)
        self._pool.submit(self._draft, stream, prompt, max_new_tokens, adapter, guard)
        return stream

    def retry_after_s(self) -> int:
        return 1

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    # One draft, in a pool thread
    def _draft(self, stream, prompt, max_new_tokens, adapter, guard) -> None:
        try:
            model = self._offer(adapter) if adapter is not None else self.model
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_new_tokens,
                "temperature": 0.0,
                "stream": True,
                "stop_token_ids": sorted(self.stop_ids),
                "repetition_penalty": guard.repetition_penalty,
                "frequency_penalty": guard.frequency_penalty,
                "presence_penalty": guard.presence_penalty,
                "return_token_ids": True,
                "skip_special_tokens": False,
                # Read by a draftloop server; vLLM has no such parameter and ignores these
                "no_repeat_ngram_size": guard.no_repeat_ngram_size,
                "base_fingerprint": self.base_fingerprint,
            }
            if not self._stream_tokens(stream, body, max_new_tokens, guard):
                if adapter is None or not self.load_route:
                    raise UpstreamFailed(f"the drafting server at {self.url} does not serve the model {model!r}")
                self._offered.discard(model)  # the server restarted and forgot the adapter: load it again
                self._offer(adapter)
                self._stream_tokens(stream, body, max_new_tokens, guard, retrying=True)
        except Exception as error:
            if stream.finish_reason is None:
                stream._finish("error", error)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _stream_tokens(self, stream, body, max_new_tokens, guard, retrying=False) -> bool:
        """Stream one completion into `stream`; False if the server does not know the model."""
        try:
            with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code == 404 and not retrying:
                    return False
                self._raise_for(response)
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    try:
                        choice = json.loads(line[6:])["choices"][0]
                    except (ValueError, KeyError, IndexError, TypeError) as error:
                        raise UpstreamFailed(f"the drafting server at {self.url} sent {line[:200]!r}") from error
                    for token in choice.get("token_ids") or []:
                        if emit(stream, token, self.stop_ids, guard, max_new_tokens):
                            return True  # leaving the block closes the request: the server aborts it
                    if stream.cancelled:
                        stream._finish("cancelled")
                        return True
                    if choice.get("finish_reason") is not None:
                        stop = choice.get("stop_reason")
                        if isinstance(stop, int) and emit(stream, stop, self.stop_ids, guard, max_new_tokens):
                            return True  # a server that leaves the stop token out of token_ids
                        stream._finish("stop" if choice["finish_reason"] == "stop" else "length")
                        return True
            raise UpstreamFailed(f"the drafting server at {self.url} ended a completion without a finish reason")
        except httpx.TransportError as error:
            raise Overloaded(
                f"the drafting server at {self.url} cannot be reached ({type(error).__name__}); retry later",
                retry_after_s=UNREACHABLE_RETRY_S,
            ) from error

    def _raise_for(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        text = response.read().decode(errors="replace")[:500]
        if response.status_code in (429, 503):
            retry = int(value) if (value := response.headers.get("retry-after", "")).isdigit() else 1
            raise Overloaded(f"the drafting server is busy ({response.status_code}): {text}", retry_after_s=retry)
        raise UpstreamFailed(f"the drafting server at {self.url} answered {response.status_code}: {text}")

    # Adapters
    def _offer(self, adapter: AdapterRef) -> str:
        """The adapter's name, published (and loaded) for the server once per process."""
        name = adapter.name
        if not name:
            raise ValueError(f"adapter {adapter.id} has no published name; a remote server cannot draft with it")
        if name in self._offered:
            return name
        folder = self._publish(adapter) if self.publish_dir is not None else None
        if self.load_route and folder is not None:
            response = self._client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)})
            if response.status_code >= 400 and "already" not in response.text:
                self._raise_for(response)
        self._offered.add(name)
        return name

    def _publish(self, adapter: AdapterRef) -> Path:
        """Write the adapter's folder under its name, whole or not at all (a temporary folder
        renamed into place); a folder already there is the same version, never rewritten.
        The config names the base model's folder, which vLLM's resolver requires to be the
        `--model` it serves: the same folder as this process's (a shared filesystem). The
        adapter's scale is folded into lora_alpha (its name says the scale)."""
        folder = self.publish_dir / adapter.name
        if folder.is_dir():
            return folder
        self.publish_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{adapter.name}.tmp-", dir=self.publish_dir))
        try:
            config = json.loads((adapter.path / "adapter_config.json").read_text())
            config["base_model_name_or_path"] = self.base_path
            if adapter.scale != 1.0:
                config["lora_alpha"] = adapter.scale * config["lora_alpha"]
            (scratch / "adapter_config.json").write_text(json.dumps(config, indent=2))
            shutil.copyfile(adapter.path / "adapter_model.safetensors", scratch / "adapter_model.safetensors")
            scratch.chmod(0o755)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        rename_into_place(scratch, folder)
        log.info("published adapter %s for %s", adapter.name, self.url)
        return folder
