"""Crash windows the random kills found, each pinned down by one deterministic test."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from sluiceway import Pipeline, Runtime, Worker
from sluiceway.buckets.local import TMP_DIR, LocalBucket
from sluiceway.faults import read_log

from .conftest import Reaper
from .harness import (
    FUNCTION,
    PIPELINE,
    alive,
    audit,
    children,
    drop_file,
    make_input,
    sluiceway_cmd,
    stage_file,
    wait_for,
    write_pipeline,
)


def _spawned_children(pid: int) -> list[int]:
    out = []
    for child in children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
        except FileNotFoundError:
            continue
    return out


@pytest.mark.timeout(120)
def test_workers_exit_when_their_runtime_is_killed(tmp_path: Path, reaper: Reaper) -> None:
    """A SIGKILLed runtime must not leave its workers running unsupervised.

    Nothing would restart them or enforce timeouts, they would keep taking
    messages with the old configuration, and a restarted runtime would run
    beside them.
    """
    path = write_pipeline(tmp_path)
    log = tmp_path / "runtime.log"
    with log.open("ab") as out:
        proc = reaper.group(
            subprocess.Popen(
                sluiceway_cmd(path, "run", "--workers", "2", "--no-watch"),
                cwd=tmp_path,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        )
    workers: list[int] = []

    def two_workers() -> bool:
        nonlocal workers
        assert proc.poll() is None, f"the runtime exited: {log.read_text(errors='replace')}"
        workers = _spawned_children(proc.pid)
        return len(workers) == 2

    wait_for(two_workers, 60, "the runtime to start two workers")
    time.sleep(1.0)  # let them reach their poll loop
    os.kill(proc.pid, signal.SIGKILL)  # the runtime only, not its process group
    proc.wait(10)
    wait_for(
        lambda: not any(alive(w) for w in workers),
        10,
        f"workers {workers} to exit after their runtime {proc.pid} was SIGKILLed",
    )


@pytest.mark.timeout(120)
def test_finished_work_is_not_redone_after_a_kill_before_the_ack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reaper: Reaper
) -> None:
    """Killed once the ledger says done: the input is never run again.

    The supervisor blames the dead worker's message; that must not turn the
    finished ledger entry back into "failed", which makes the input run again
    (and leaves it "failed" for good when the ack had already happened). On
    the embedded default "done" and the ack commit together, so the kill
    lands after both and nothing may be blamed or redelivered at all.
    """
    kill_log = tmp_path / "kills.jsonl"
    monkeypatch.setenv("SLUICEWAY_FAULTS", f"after_done:1,max=1,log={kill_log}")
    path = write_pipeline(tmp_path)
    inp = make_input(1, random.Random(1))
    p = Pipeline.from_file(path)
    event = p.put(stage_file(tmp_path, inp), "bronze", inp.key)
    assert event is not None
    p.close()

    rt = Runtime(path, workers=1, watch=False, grace=5.0)
    original_spawn = rt._spawn
    rt._spawn = lambda i: reaper.proc(original_spawn(i))  # type: ignore[method-assign]
    key = f"{FUNCTION}|{event.input_identity}"
    deadline = time.monotonic() + 60
    try:
        rt.start()
        while True:
            rt.tick(0.05)
            entry = rt.pipeline.ledger.get(key)
            killed = bool(read_log(kill_log))
            if killed and rt.pipeline.pending() == 0 and entry and entry.status == "done":
                break
            assert time.monotonic() < deadline, f"not done after 60s: {entry}"
    finally:
        rt.stop()
    entry = rt.pipeline.ledger.get(key)
    rt.pipeline.close()
    assert len(read_log(kill_log)) == 1
    assert entry is not None and entry.status == "done"
    assert entry.attempts == 1, f"finished work was claimed and run again: {entry}"
    assert entry.info["attempt"] == 1


def test_a_message_stays_hidden_while_its_claim_lives(tmp_path: Path) -> None:
    """The claim must not outlive the message's invisibility.

    Otherwise the first re-delivery after a crash finds the dead worker's
    claim still live ("busy"), which costs a receive: with max_receive_count
    2, one crash with no supervisor left to blame it (the whole runtime
    killed) dead-letters a healthy message.
    """
    module = f"claim_probe_{uuid.uuid4().hex}"
    record = tmp_path / "probe.json"
    db = tmp_path / ".sluiceway" / "state.db"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            f"""
            import json, sqlite3

            def probe(batch, ctx):
                conn = sqlite3.connect({str(db)!r})
                visible_at = conn.execute("SELECT visible_at FROM messages").fetchone()[0]
                expires_at = conn.execute("SELECT expires_at FROM ledger").fetchone()[0]
                conn.close()
                with open({str(record)!r}, "w") as f:
                    json.dump({{"visible_at": visible_at, "expires_at": expires_at}}, f)
                return batch
            """
        )
    )
    text = PIPELINE.replace(
        "      - write_parquet", f"      - call: {module}:probe\n      - write_parquet"
    )
    p = Pipeline.from_file(write_pipeline(tmp_path, text))
    inp = make_input(3, random.Random(3), max_rows=300)
    assert p.put(stage_file(tmp_path, inp), "bronze", inp.key) is not None
    outcomes = Worker(p).poll(wait=1.0)
    p.close()
    assert [o.status for o in outcomes] == ["done"]
    seen = json.loads(record.read_text())
    assert seen["visible_at"] >= seen["expires_at"], (
        f"the message becomes visible {seen['expires_at'] - seen['visible_at']:.4f}s before "
        "its claim expires: a re-delivery after a crash finds it busy"
    )


@pytest.mark.timeout(120)
def test_temp_files_of_killed_writers_are_swept(tmp_path: Path, reaper: Reaper) -> None:
    """A writer killed mid-write leaves a file aside; its supervisor removes it.

    Readers never see it (it was never published), but nothing else would
    ever delete it.
    """
    kill_log = tmp_path / "kills.jsonl"
    env = {**os.environ, "SLUICEWAY_FAULTS": f"during_write:1,max=1,log={kill_log}"}
    path = write_pipeline(tmp_path)
    inp = make_input(2, random.Random(2))
    drop_file(tmp_path, inp)
    proc = reaper.group(
        subprocess.Popen(
            sluiceway_cmd(path, "run", "--drain", "--workers", "1", "--no-watch"),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    )
    assert proc.wait(90) == 0
    assert len(read_log(kill_log)) == 1
    assert audit(tmp_path, [inp]).problems == []
    assert list((tmp_path / "staging" / ".sluiceway-tmp").glob("*")) == []


def test_the_sweep_takes_a_zombie_writer_for_dead(tmp_path: Path) -> None:
    """After ``kill -9`` of a runtime its workers are reparented to PID 1; a PID 1
    that reaps late or never (containers without an init) leaves them zombies,
    and ``os.kill(pid, 0)`` succeeds on a zombie."""
    bucket = LocalBucket("staging", tmp_path / "staging")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_for(lambda: _state(child.pid) == "Z", 30, f"process {child.pid} to be a zombie")
        aside = tmp_path / "staging" / TMP_DIR / f"{child.pid}-0123456789abcdef.tmp"
        aside.parent.mkdir(parents=True, exist_ok=True)
        aside.write_bytes(b"PAR1 half a file")
        bucket.sweep()
        assert not aside.exists(), f"left {aside.name} of dead (zombie) writer {child.pid}"
    finally:
        child.wait(10)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return None
