"""The runtime's stop and drain flags survive workers killed at any moment.

They were ``multiprocessing.Event``s, which take a semaphore even to be read:
a worker SIGKILLed while holding it left it taken, and the runtime hung at
its next look at the flag (seen in the fault tests' worker kills).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

from sluiceway.runtime import SharedFlag


def _read_forever(flag: SharedFlag, started: SharedFlag) -> None:
    started.set()
    while True:
        flag.is_set()


def _answers_within(seconds: float, call: object) -> bool:
    done = threading.Event()

    def run() -> None:
        call()  # type: ignore[operator]
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(seconds)


def test_readers_killed_mid_read_leave_the_flag_usable() -> None:
    ctx = mp.get_context("spawn")
    flag = SharedFlag(ctx)
    for _ in range(5):
        started = SharedFlag(ctx)
        reader = ctx.Process(target=_read_forever, args=(flag, started), daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while not started.is_set():
            assert time.monotonic() < deadline, "the reader did not start"
            time.sleep(0.01)
        time.sleep(0.05)  # reading flat out when killed
        reader.kill()
        reader.join(10)
        # (A bool: pytest's report of a failure would call the hung flag's repr.)
        read = _answers_within(5, flag.is_set)
        assert read, "is_set() hung after a reader was killed"
    written = _answers_within(5, flag.set)
    assert written, "set() hung after a reader was killed"
    assert flag.is_set()


def test_set_is_seen_by_another_process() -> None:
    ctx = mp.get_context("spawn")
    flag, seen = SharedFlag(ctx), SharedFlag(ctx)
    child = ctx.Process(target=_echo, args=(flag, seen), daemon=True)
    child.start()
    try:
        flag.set()
        deadline = time.monotonic() + 30
        while not seen.is_set():
            assert time.monotonic() < deadline, "the child never saw the flag"
            time.sleep(0.01)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()


def _echo(flag: SharedFlag, seen: SharedFlag) -> None:
    deadline = time.monotonic() + 30
    while not flag.is_set() and time.monotonic() < deadline:
        time.sleep(0.005)
    if flag.is_set():
        seen.set()
