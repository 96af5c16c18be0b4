"""``sluiceway serve``: the HTTP door through which producers append events to streams.

::

    POST /streams/{stream}        Authorization: Bearer <token>
        Content-Type: application/json       a JSON array of events (or one event)
        Content-Type: application/x-ndjson   JSON Lines (also application/jsonl)
    → 202 {"accepted": n, "stream": …, "first_seq": …, "last_seq": …}
    GET /healthz                  open: 200 {"status": "ok"}
    GET /metrics                  open: Prometheus text (accepted/rejected events, stream lengths)

It is a door into the data, so it is shut by default: it binds 127.0.0.1
unless told otherwise, every ingest needs a bearer token (from
``SLUICEWAY_INGEST_TOKENS``, comma-separated, and/or a tokens file, one per
line), compared in constant time; bodies and batches have size limits (413),
the content type is checked (415). A batch is all or nothing: one bad record
rejects the request with a 400 naming each bad record by index and field, so
a producer fixes and re-sends the whole batch knowing nothing was half-taken.
202 is answered only after the stream's SQLite commit (``synchronous=FULL``)
returned: an accepted event survives a crash or a power cut.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import SluicewayError
from .pipeline import Pipeline
from .streams.events import EventError, events_batch, parse_json_lines

log = logging.getLogger("sluiceway.ingest")

TOKENS_ENV = "SLUICEWAY_INGEST_TOKENS"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY = 5 << 20  # bytes
DEFAULT_MAX_BATCH = 5_000  # events per request
JSON_TYPES = frozenset({"application/json"})
JSONL_TYPES = frozenset(
    {
        "application/x-ndjson",
        "application/jsonl",
        "application/x-jsonlines",
        "application/jsonlines",
        "application/json-lines",
    }
)


class NoTokens(SluicewayError):
    """``serve`` was asked to open the door without any token to check."""


def load_tokens(
    env_value: str | None = None, tokens_file: str | os.PathLike[str] | None = None
) -> list[str]:
    """Tokens from the environment (comma-separated) and a file (one per line, # comments)."""
    tokens = [t.strip() for t in (env_value or "").split(",") if t.strip()]
    if tokens_file is not None:
        path = Path(tokens_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise SluicewayError(f"cannot read tokens file {path}: {e.strerror}") from None
        if path.stat().st_mode & 0o077:
            log.warning("tokens file %s is readable by other users; chmod 600 it", path)
        tokens += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    for t in tokens:
        if len(t) < 16:
            log.warning("an ingest token is shorter than 16 characters; use long random tokens")
    return tokens


class TokenCheck:
    """Constant-time comparison against every known token (no early exit, no length leak)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise NoTokens(
                f"no ingest tokens: set {TOKENS_ENV}=token1,token2 or pass --tokens-file "
                "(a file with one token per line)"
            )
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]

    def __call__(self, given: str) -> bool:
        digest = hashlib.sha256(given.encode(errors="surrogateescape")).digest()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(d, digest)
        return ok


class StreamCollector(Collector):
    """Stream lengths, heads and consumer lag, read from the state database at scrape time."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def collect(self) -> Iterator[Any]:
        length = GaugeMetricFamily("sluiceway_stream_records", "Records held", labels=["stream"])
        head = GaugeMetricFamily("sluiceway_stream_last_seq", "Newest seq", labels=["stream"])
        lag = GaugeMetricFamily(
            "sluiceway_stream_lag",
            "Records not yet committed by a stream function",
            labels=["stream", "function"],
        )
        for name, info in self.pipeline.stream_status().items():
            length.add_metric([name], info["length"])
            head.add_metric([name], info["last_seq"])
            for fn, c in info["consumers"].items():
                lag.add_metric([name, fn], c["lag"])
        yield length
        yield head
        yield lag


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="sluiceway"'} if status == 401 else None
    return JSONResponse({"error": code, "message": message, **extra}, status, headers=headers)


def create_app(
    pipeline: Pipeline,
    *,
    tokens: Sequence[str],
    max_body_bytes: int = DEFAULT_MAX_BODY,
    max_batch: int = DEFAULT_MAX_BATCH,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """The ingest application; ``registry`` lets others add metrics to ``/metrics``."""
    check = TokenCheck(tokens)
    registry = registry or CollectorRegistry()
    accepted = Counter(
        "sluiceway_ingest_events_accepted",
        "Events appended to a stream through the ingest endpoint",
        ["stream"],
        registry=registry,
    )
    rejected = Counter(
        "sluiceway_ingest_events_rejected",
        "Events (or requests, when unparseable) rejected by the ingest endpoint",
        ["stream", "reason"],
        registry=registry,
    )
    registry.register(StreamCollector(pipeline))
    try:  # function and queue metrics, where that module exists
        from .metrics import LedgerCollector

        registry.register(LedgerCollector(pipeline))
    except (ImportError, ValueError):
        pass

    def refuse(
        stream: str, status: int, code: str, message: str, n: int = 1, **extra: Any
    ) -> JSONResponse:
        rejected.labels(stream, code).inc(n)
        return _error(status, code, message, **extra)

    async def ingest(request: Request) -> Response:
        name = request.path_params["stream"]
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error(401, "unauthorized", "send 'Authorization: Bearer <token>'")
        if not check(token.strip()):
            return _error(401, "unauthorized", "the bearer token is not valid")
        stream = pipeline.streams.get(name)
        if stream is None:
            known = ", ".join(sorted(pipeline.streams)) or "none"
            return _error(404, "unknown_stream", f"unknown stream {name!r} (streams: {known})")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in JSON_TYPES | JSONL_TYPES:
            return refuse(
                name,
                415,
                "unsupported_media_type",
                f"content type {ctype or '(none)'!r}: send application/json (an array of "
                "events) or application/x-ndjson (JSON Lines)",
            )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return refuse(
                name,
                413,
                "body_too_large",
                f"body of {declared} bytes is over the limit of "
                f"{max_body_bytes} bytes; send smaller batches",
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return refuse(
                    name,
                    413,
                    "body_too_large",
                    f"body is over the limit of {max_body_bytes} bytes; send smaller batches",
                )
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            return refuse(name, 400, "malformed_body", f"body is not UTF-8 (byte {e.start})")
        lines: list[int] | None = None
        try:
            if ctype in JSON_TYPES:
                parsed = json.loads(text)
                objs = [parsed] if isinstance(parsed, dict) else parsed
                if not isinstance(objs, list):
                    return refuse(
                        name,
                        400,
                        "malformed_body",
                        f"expected a JSON array of events, got {type(parsed).__name__}",
                    )
            else:
                objs, lines = parse_json_lines(text)
        except json.JSONDecodeError as e:
            return refuse(name, 400, "malformed_json", f"not valid JSON: {e}")
        except EventError as e:
            return refuse(
                name, 400, "malformed_json", str(e), errors=[p.to_dict() for p in e.problems]
            )
        if not objs:
            return refuse(name, 400, "empty_batch", "no events in the body")
        if len(objs) > max_batch:
            return refuse(
                name,
                413,
                "batch_too_large",
                f"batch of {len(objs)} events is over the limit of {max_batch}",
                n=len(objs),
            )
        try:
            events = events_batch(objs, lines)
        except EventError as e:
            first = e.problems[0]
            return refuse(
                name,
                400,
                "bad_record",
                str(e),
                n=len(objs),
                index=first.index,
                field=first.field,
                errors=[p.to_dict() for p in e.problems],
                bad_records=e.total,
            )
        try:
            seqs = await run_in_threadpool(stream.append_events, events)
        except Exception:
            log.exception("append to stream %s failed", name)
            return refuse(
                name,
                503,
                "unavailable",
                "the stream could not commit the events; nothing was accepted, retry later",
                n=events.num_rows,
            )
        accepted.labels(name).inc(len(seqs))
        return JSONResponse(
            {"accepted": len(seqs), "stream": name, "first_seq": seqs[0], "last_seq": seqs[-1]},
            202,
        )

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        data = await run_in_threadpool(generate_latest, registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    app = Starlette(
        routes=[
            Route("/streams/{stream}", ingest, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )
    app.state.registry = registry
    app.state.pipeline = pipeline
    return app


def serve(
    pipeline_path: str | os.PathLike[str],
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    tokens: Sequence[str],
    max_body_bytes: int = DEFAULT_MAX_BODY,
    max_batch: int = DEFAULT_MAX_BATCH,
    on_ready: Callable[[str, int], None] | None = None,
    log_level: str = "warning",
) -> None:
    """Run the ingest endpoint until SIGINT/SIGTERM (uvicorn's graceful shutdown).

    The socket is bound here, before uvicorn starts, so ``port=0`` picks a
    free port that ``on_ready`` reports and no other process can take it in
    between.
    """
    import uvicorn

    pipeline = Pipeline.from_file(pipeline_path)
    app = create_app(pipeline, tokens=tokens, max_body_bytes=max_body_bytes, max_batch=max_batch)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    actual = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host=host,
        port=actual,
        log_level=log_level,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    if on_ready is not None:
        on_ready(host, actual)

    def stopped(signum: int, frame: object) -> None:
        raise SystemExit(0)

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal
    # again under the handlers it found: a clean stop exits 0, not -15.
    signal.signal(signal.SIGINT, stopped)
    signal.signal(signal.SIGTERM, stopped)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        pipeline.close()
