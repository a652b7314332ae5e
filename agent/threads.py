"""Running one-off torch work in a thread that ends with it."""

import threading


def in_fresh_thread(fn, *args):
    """Run fn(*args) in a new thread that ends with it, and return its result.

    A thread that has run parallel torch work keeps an OpenMP team for as long as it lives, and
    libgomp stops spin-waiting once a process has more OpenMP threads than cores: with one idle
    team beside the engine's, decode steps took 65-70 ms instead of 43 (measured, 2 cores).
    One-off work in a serving process (loading the model) therefore runs in a thread that ends."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as error:  # re-raised in the caller
            box["error"] = error

    thread = threading.Thread(target=run, name="draftloop-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
