"""What every benchmark records beside its figures: the machine it ran on."""

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory_gib, 1),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def save(name: str, figures: dict) -> Path:
    """Print the figures and write them, with the machine, to bench/results/<name>.json."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "figures": figures}, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"saved to {path}")
    return path
