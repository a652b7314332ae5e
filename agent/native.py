"""The engine's small C kernels (agent/*.c), compiled on first use for the CPU they run on.

A kernel is compiled with cc or gcc (-O3 -march=native -fopenmp, about a second) into the user's
cache folder (~/.cache/draftloop/kernels), keyed by its source and the CPU's flags, and loaded
after torch, so that its OpenMP threads are PyTorch's own team (a second OpenMP runtime's idle
team would slow every decode step: agent/threads.py). Where it cannot be built (no compiler,
one without OpenMP, a CPU without the instructions it is written for), `library` gives None and
the caller keeps PyTorch's own products, with a warning in the log."""

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def library(source: Path) -> ctypes.CDLL | None:
    """The compiled `source`, or None where it cannot be built here."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: %s is not used, PyTorch's products are (slower)", source.name)
        return None
    digest = hashlib.sha256(source.read_bytes() + _cpu_flags().encode()).hexdigest()[:16]
    name = f"{source.stem}-{digest}.so"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "draftloop" / "kernels"
    built = cache / name
    if not built.exists():
        folder = _writable(cache)
        built = folder / name
        partial = folder / f".{name}-{os.getpid()}"
        command = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(partial), str(source)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("%s did not compile (%s): PyTorch's products are used", source.name, result.stderr.strip())
            return None
        partial.replace(built)  # atomic: processes compiling at once each install a whole file
    return ctypes.CDLL(str(built))


def _writable(cache: Path) -> Path:
    """The cache folder, made if need be; where it cannot be written (a read-only home), a
    temporary folder of this process's own (mode 0700, so no other user can place a library in it)."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache
    except OSError:
        pass
    folder = Path(tempfile.mkdtemp(prefix="draftloop-kernels-"))
    log.warning("%s cannot be written: the kernels are built in %s for this process", cache, folder)
    return folder


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""
