"""The HTTP ingest endpoint: auth, limits, content types, bad records, durable 202s."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

with warnings.catch_warnings():
    # Starlette 1.10 prefers its httpx2 fork for TestClient; plain httpx (pinned) works.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from sluiceway import Pipeline
from sluiceway.errors import SluicewayError
from sluiceway.ingest import NoTokens, TokenCheck, create_app, load_tokens
from sluiceway.state import StateDB
from sluiceway.streams.sqlite import SqliteStream

TOKEN = "t0k3n-for-tests-0123456789abcdef"
OTHER = "second-token-abcdefghijklmnopqrs"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {**AUTH, "Content-Type": "application/json"}
JSONL = {**AUTH, "Content-Type": "application/x-ndjson"}

PIPELINE = """
pipeline: ingest
buckets:
  lake: ./lake
streams:
  events: {}
functions:
  to-lake:
    stream: events
    steps:
      - write_dataset: {bucket: lake}
"""


def ev(i: int, **over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "event_uuid": f"id-{i}",
        "event_name": "signup",
        "created_at": "2026-11-24T10:00:00+02:00",
        "payload": {"i": i},
    }
    out.update(over)
    return {k: v for k, v in out.items() if v is not None}


@pytest.fixture
def pipeline_path(tmp_path: Path) -> Path:
    path = tmp_path / "sluiceway.yaml"
    path.write_text(textwrap.dedent(PIPELINE))
    return path


@pytest.fixture
def client(pipeline_path: Path) -> Iterator[TestClient]:
    p = Pipeline.from_file(pipeline_path)
    app = create_app(p, tokens=[TOKEN, OTHER], max_body_bytes=4096, max_batch=5)
    with TestClient(app) as c:
        yield c
    p.close()


def stored(path: Path) -> list[dict[str, Any]]:
    """What the stream holds, read through a brand-new connection (durable, not cached)."""
    p = Pipeline.from_file(path)
    try:
        stream = SqliteStream(StateDB(p.config.state_path / "state.db"), "events")
        return [r.data for r in stream.read(1, 1000)]
    finally:
        p.close()


def test_accepts_a_json_array_and_json_lines(client: TestClient, pipeline_path: Path) -> None:
    r = client.post("/streams/events", json=[ev(1), ev(2)], headers=AUTH)
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 2, "stream": "events", "first_seq": 1, "last_seq": 2}
    body = "\n".join(json.dumps(ev(i)) for i in (3, 4)) + "\n\n"
    r = client.post("/streams/events", content=body, headers=JSONL)
    assert r.status_code == 202 and r.json()["last_seq"] == 4
    r = client.post("/streams/events", content=json.dumps(ev(5)), headers=JSON)  # one object
    assert r.status_code == 202 and r.json()["accepted"] == 1
    got = stored(pipeline_path)
    assert [e["event_uuid"] for e in got] == [f"id-{i}" for i in range(1, 6)]
    assert got[0]["created_at"] == "2026-11-24T08:00:00.000000Z"  # normalised to UTC
    assert got[0]["payload"] == {"i": 1}


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "Bearer"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Bearer"),
        ({"Authorization": "Bearer "}, "Bearer"),
        ({"Authorization": "Bearer wrong-token-wrong-token-wrong"}, "not valid"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "not valid"),
    ],
)
def test_ingest_needs_a_valid_token(
    client: TestClient, pipeline_path: Path, headers: dict[str, str], message: str
) -> None:
    r = client.post("/streams/events", json=[ev(1)], headers=headers)
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized" and message in r.json()["message"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert stored(pipeline_path) == []


def test_every_configured_token_works_and_health_is_open(client: TestClient) -> None:
    r = client.post("/streams/events", json=[ev(1)], headers={"Authorization": f"Bearer {OTHER}"})
    assert r.status_code == 202
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("records", "index", "field", "text"),
    [
        ([ev(0), ev(1, event_uuid=None)], 1, "event_uuid", "missing"),
        ([ev(0, event_name="")], 0, "event_name", "non-empty string"),
        ([ev(0), ev(1), ev(2, created_at="24/11/2026")], 2, "created_at", "ISO 8601"),
        ([ev(0, created_at=1732442400)], 0, "created_at", "ISO 8601"),
        ([ev(0, user="x")], 0, "user", "unknown field"),
        ([ev(0), "not an object"], 1, None, "expected a JSON object"),
    ],
)
def test_bad_records_are_named_and_nothing_is_accepted(
    client: TestClient,
    pipeline_path: Path,
    records: list[Any],
    index: int,
    field: str | None,
    text: str,
) -> None:
    r = client.post("/streams/events", json=records, headers=AUTH)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "bad_record"
    assert (body["index"], body["field"]) == (index, field)
    assert text in body["message"] and f"record {index}" in body["message"]
    assert stored(pipeline_path) == []


def test_json_lines_errors_name_the_line(client: TestClient, pipeline_path: Path) -> None:
    body = json.dumps(ev(0)) + "\n\n{not json}\n"
    r = client.post("/streams/events", content=body, headers=JSONL)
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"
    assert r.json()["errors"][0]["line"] == 3 and "line 3" in r.json()["message"]
    body = json.dumps(ev(0)) + "\n" + json.dumps(ev(1, created_at="yesterday")) + "\n"
    r = client.post("/streams/events", content=body, headers=JSONL)
    assert r.status_code == 400
    assert r.json()["errors"] == [
        {"index": 1, "line": 2, "field": "created_at", "message": r.json()["errors"][0]["message"]}
    ]
    assert stored(pipeline_path) == []


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ('[{"event_uuid": "a",', "malformed_json"),
        ('{"events": 1}', "bad_record"),  # an object is one event: this one is bad
        ("42", "malformed_body"),
        ("[]", "empty_batch"),
        (b"\xff\xfe[]", "malformed_body"),
    ],
)
def test_malformed_bodies_are_400(client: TestClient, content: str | bytes, error: str) -> None:
    r = client.post("/streams/events", content=content, headers=JSON)
    assert r.status_code == 400 and r.json()["error"] == error, r.text


def test_limits_content_type_and_unknown_streams(client: TestClient, pipeline_path: Path) -> None:
    big = [ev(i, payload={"pad": "x" * 1500}) for i in range(3)]
    r = client.post("/streams/events", json=big, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        yield b"["
        for i in range(10):
            yield json.dumps(ev(i, payload={"pad": "y" * 900})).encode() + b","
        yield b"{}]"

    r = client.post("/streams/events", content=chunks(), headers=JSON)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    r = client.post("/streams/events", json=[ev(i) for i in range(6)], headers=AUTH)
    assert r.status_code == 413 and r.json()["error"] == "batch_too_large"
    assert "6 events" in r.json()["message"]
    r = client.post(
        "/streams/events", content="a,b\n", headers={**AUTH, "Content-Type": "text/csv"}
    )
    assert r.status_code == 415 and "application/x-ndjson" in r.json()["message"]
    r = client.post("/streams/nope", json=[ev(1)], headers=AUTH)
    assert r.status_code == 404 and "streams: events" in r.json()["message"]
    assert stored(pipeline_path) == []


def test_metrics_count_accepted_and_rejected_events(client: TestClient) -> None:
    client.post("/streams/events", json=[ev(1), ev(2), ev(3)], headers=AUTH)
    client.post("/streams/events", json=[ev(1, created_at="x"), ev(2)], headers=AUTH)
    text = client.get("/metrics").text
    assert 'sluiceway_ingest_events_accepted_total{stream="events"} 3.0' in text
    assert 'sluiceway_ingest_events_rejected_total{reason="bad_record",stream="events"} 2.0' in text
    assert 'sluiceway_stream_records{stream="events"} 3.0' in text
    assert 'sluiceway_stream_lag{function="to-lake",stream="events"} 3.0' in text


def test_tokens_from_env_and_file(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# ingest tokens\nfile-token-0123456789abcdef\n\n")
    f.chmod(0o600)
    tokens = load_tokens(" env-token-0123456789abcdef , ,", f)
    assert tokens == ["env-token-0123456789abcdef", "file-token-0123456789abcdef"]
    check = TokenCheck(tokens)
    assert check("file-token-0123456789abcdef") and not check("file-token")
    with pytest.raises(NoTokens, match="SLUICEWAY_INGEST_TOKENS"):
        TokenCheck(load_tokens("", None))
    with pytest.raises(SluicewayError, match="cannot read tokens file"):
        load_tokens(None, tmp_path / "missing")


# -- a real server -----------------------------------------------------------------


@pytest.fixture
def server(pipeline_path: Path, tmp_path: Path) -> Iterator[str]:
    env = {**os.environ, "SLUICEWAY_INGEST_TOKENS": TOKEN}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sluiceway",
            "serve",
            "--pipeline",
            str(pipeline_path),
            "--port",
            "0",
            "--max-body-bytes",
            "2048",
            "--max-batch",
            "10",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert m, f"no address in {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
        yield m.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_real_server_on_localhost(server: str, pipeline_path: Path) -> None:
    with httpx.Client(base_url=server, timeout=10) as http:
        assert http.get("/healthz").status_code == 200
        assert http.post("/streams/events", json=[ev(1)]).status_code == 401
        bad = http.post("/streams/events", json=[ev(1), ev(2, event_name=None)], headers=AUTH)
        assert bad.status_code == 400 and (bad.json()["index"], bad.json()["field"]) == (
            1,
            "event_name",
        )
        big = http.post("/streams/events", json=[ev(1, payload={"x": "z" * 3000})], headers=AUTH)
        assert big.status_code == 413
        for i in range(3):
            r = http.post("/streams/events", json=[ev(10 * i + j) for j in range(4)], headers=AUTH)
            assert r.status_code == 202, r.text
            # 202 means durable: another process sees the events right now.
            assert len(stored(pipeline_path)) == 4 * (i + 1)
        assert "sluiceway_ingest_events_accepted_total" in http.get("/metrics").text
    # Bound to loopback only by default.
    port = int(server.rsplit(":", 1)[1])
    assert port > 0
