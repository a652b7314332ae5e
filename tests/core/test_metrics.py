import os
import subprocess
import sys

from core.metrics import forget_dead_processes


def test_the_live_gauges_of_dead_workers_are_forgotten(tmp_path):
    """A worker killed without a goodbye leaves its queue depth behind; the next scrape drops it,
    and keeps every worker's counts."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, alive_pid = int(dead.stdout), os.getpid()
    for name in (f"gauge_livesum_{dead_pid}", f"gauge_livesum_{alive_pid}", f"counter_{dead_pid}"):
        (tmp_path / f"{name}.db").write_bytes(b"")
    forget_dead_processes(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{dead_pid}.db", f"gauge_livesum_{alive_pid}.db"]
    )
