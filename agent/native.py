"""The engine's small C kernels (agent/*.c), compiled on first use for the CPU they run on.

A kernel is compiled with cc or gcc (-O3 -march=native -fopenmp, about a second) into the user's
cache folder (~/.cache/draftloop/kernels), keyed by its source (with the files of this folder it
includes) and the CPU's flags, and loaded
after torch, so that its OpenMP threads are PyTorch's own team (a second OpenMP runtime's idle
team would slow every decode step: agent/threads.py). Where it cannot be built (no compiler,
one without OpenMP, a CPU without the instructions it is written for), `library` gives None and
the caller keeps PyTorch's own products, with a warning in the log."""

import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def library(source: Path) -> ctypes.CDLL | None:
    """The compiled `source`, or None where it cannot be built here."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: %s is not used, PyTorch's products are (slower)", source.name)
        return None
    included = b"".join(source.with_name(name).read_bytes() for name in _INCLUDE.findall(source.read_text()))
    digest = hashlib.sha256(source.read_bytes() + included + _cpu_flags().encode()).hexdigest()[:16]
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


_INCLUDE = re.compile(r'^#include "([^"]+)"', re.MULTILINE)  # a kernel's own files it includes


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


HUGE_PAGE = 2**21  # bytes


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """A buffer of `nbytes` int8 whose pages are 2 MiB where Linux gives them (transparent huge
    pages on request, madvise), so that a decode step reading every weight once in order misses
    the TLB once per 2 MiB instead of once per 4 KiB: on 2 AVX-512 Xeon cores, int8 weights held in
    one such buffer decoded a token in 8.1 ms, against 9.0 on 4 KiB pages and 10.2 held apart."""
    held = torch.empty(nbytes + HUGE_PAGE, dtype=torch.int8)
    start = -held.data_ptr() % HUGE_PAGE
    buffer = held[start : start + nbytes]
    if sys.platform.startswith("linux"):  # elsewhere the system's own page size
        ctypes.CDLL(None).madvise(ctypes.c_void_p(buffer.data_ptr()), ctypes.c_size_t(nbytes), _MADV_HUGEPAGE)
    return buffer


_MADV_HUGEPAGE = 14
