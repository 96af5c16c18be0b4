"""The ``sluiceway`` command: parses arguments, calls the API, renders with rich.

Nothing here decides anything; each command is a few lines over
``Pipeline``, ``Runtime`` or ``Worker`` so the Python API can do all of it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import ConfigError, SluicewayError
from .pipeline import Pipeline

app = typer.Typer(
    help="Event-driven data pipelines: files and events in, validated data out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dlq_app = typer.Typer(help="Look at and recover dead-lettered messages.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

console = Console()
err = Console(stderr=True)

PipelineOpt = Annotated[
    Path,
    typer.Option("--pipeline", "-p", help="The pipeline file.", envvar="SLUICEWAY_PIPELINE"),
]
DEFAULT_PIPELINE = Path("sluiceway.yaml")


def _use_profile(profile: str | None) -> None:
    """``--profile`` goes to the environment, so worker processes see it too."""
    if profile:
        os.environ["SLUICEWAY_PROFILE"] = profile


@app.callback()
def _main(
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            help="Run on the backends of this profile (or set SLUICEWAY_PROFILE).",
            envvar="SLUICEWAY_PROFILE",
        ),
    ] = None,
) -> None:
    _use_profile(profile)


def _load(path: Path) -> Pipeline:
    return Pipeline.from_file(path)


def _split_target(target: str) -> tuple[str, str]:
    bucket, _, key = target.partition("/")
    if not bucket or not key:
        raise typer.BadParameter(f"{target!r}: give the destination as BUCKET/KEY")
    return bucket, key


@app.command()
def validate(pipeline: PipelineOpt = DEFAULT_PIPELINE) -> None:
    """Check a pipeline file and report every mistake with its line."""
    p = _load(pipeline)
    c = p.config
    console.print(
        f"[green]ok[/green] {pipeline}: pipeline [bold]{c.pipeline}[/bold] — "
        f"{len(c.buckets)} buckets, {len(c.topics)} topics, {len(c.queues)} queues, "
        f"{len(c.rules)} rules, {len(c.functions)} functions"
    )


@app.command()
def put(
    source: Annotated[Path, typer.Argument(help="Local file to upload.", exists=True)],
    target: Annotated[str, typer.Argument(help="BUCKET/KEY, e.g. bronze/in/customers.csv")],
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
) -> None:
    """Write a file into a bucket and raise its "Object Created" event."""
    p = _load(pipeline)
    bucket, key = _split_target(target)
    event = p.put(source, bucket, key)
    if event is None:
        console.print(f"{bucket}/{key}: this version was seen before; no new event")
        return
    targets = p.router.targets_for(event)
    routed = ", ".join(t for _, t in targets) or "no rule matched"
    console.print(f"put {bucket}/{key} ({event.detail['object']['size']} bytes) → {routed}")


def _print_summary(summary: Any, as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps(summary.to_dict(), default=str))
        return
    rate = summary.done / summary.seconds if summary.seconds else 0.0
    console.print(
        f"[bold]{summary.done}[/bold] inputs processed, {summary.rows_in:,} rows in, "
        f"{summary.rows_out:,} rows out, {summary.rows_rejected:,} rejected "
        f"in {summary.seconds:.2f}s ({rate:.1f} inputs/s)"
    )
    if summary.failed or summary.dead_lettered or summary.skipped:
        console.print(
            f"[yellow]{summary.failed} failing, {summary.dead_lettered} dead-lettered, "
            f"{summary.skipped} skipped[/yellow] (see `sluiceway status` and `sluiceway dlq list`)"
        )
    if summary.outputs:
        table = Table("output", "rows", "bytes", title="Outputs written")
        for out in summary.outputs[:20]:
            table.add_row(f"{out['bucket']}/{out['key']}", f"{out['rows']:,}", f"{out['bytes']:,}")
        console.print(table)
        if len(summary.outputs) > 20:
            console.print(f"… and {len(summary.outputs) - 20} more")


@app.command()
def run(
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
    drain: Annotated[bool, typer.Option(help="Process everything pending, then exit.")] = False,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (default: one per core; 0 = inline).")
    ] = None,
    watch: Annotated[bool, typer.Option(help="Watch bucket directories for new files.")] = True,
    timeout: Annotated[
        float | None, typer.Option(help="With --drain: give up after this many seconds.")
    ] = None,
    grace: Annotated[float, typer.Option(help="Seconds in-flight work gets on stop.")] = 30.0,
    json_out: Annotated[bool, typer.Option("--json", help="Summary as JSON.")] = False,
    profile: Annotated[str | None, typer.Option(help="Backends profile to run on.")] = None,
) -> None:
    """Run the pipeline: watcher, reconcile and workers (Ctrl-C stops cleanly)."""
    from .runtime import Runtime

    _use_profile(profile)
    rt = Runtime(pipeline, workers=workers, watch=watch, grace=grace)
    if drain:
        with console.status("draining…") as st:

            def progress() -> None:
                st.update(f"draining… {rt.pipeline.pending()} messages pending")

            summary = rt.drain(timeout=timeout, on_tick=progress)
        _print_summary(summary, json_out)
    else:
        n = rt.workers
        console.print(f"running {rt.pipeline.name} with {n} workers; Ctrl-C to stop")
        rt.run_forever()
        console.print("stopped")


@app.command()
def worker(
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
    function: Annotated[
        list[str] | None, typer.Option("--function", "-f", help="Only these functions.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    grace: Annotated[float, typer.Option(help="Seconds in-flight work gets on stop.")] = 30.0,
    profile: Annotated[str | None, typer.Option(help="Backends profile to run on.")] = None,
) -> None:
    """Run workers only (no watcher, no reconcile): to scale out beside `run`."""
    from .runtime import Runtime

    _use_profile(profile)
    rt = Runtime(
        pipeline, workers=workers, watch=False, grace=grace, functions=function, reconcile=False
    )
    console.print(f"{workers} workers on {rt.pipeline.name}; Ctrl-C to stop")
    rt.run_forever()


@app.command()
def status(
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Queues (visible, in flight, delayed, dead-lettered) and functions (done, failed)."""
    p = _load(pipeline)
    data = p.status()
    if json_out:
        console.print_json(json.dumps(data))
        return
    qt = Table("queue", "visible", "in flight", "delayed", "dead-lettered", title="Queues")
    for name, q in data["queues"].items():
        label = f"{name} [dim](DLQ)[/dim]" if q["is_dlq"] else name
        qt.add_row(
            label,
            str(q["visible"]),
            str(q["in_flight"]),
            str(q["delayed"]),
            "" if q["is_dlq"] else str(q["dead_lettered"]),
        )
    console.print(qt)
    ft = Table(
        "function",
        "processed",
        "failed",
        "skipped",
        "rows in",
        "rows out",
        "rejected",
        "bytes in",
        "latency p50",
        "latency p99",
        title="Functions",
    )

    def secs(v: float | None) -> str:
        return "" if v is None else f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"

    for name, m in data["functions"].items():
        c = m["counters"]
        ft.add_row(
            name,
            str(m["processed"]),
            str(m["failed"]),
            str(m["skipped"]),
            f"{c.get('rows_in', 0):,}",
            f"{c.get('rows_out', 0):,}",
            f"{c.get('rows_rejected', 0):,}",
            f"{m['bytes_in']:,}",
            secs(m["latency_p50"]),
            secs(m["latency_p99"]),
        )
    console.print(ft)
    if data.get("streams"):
        _print_streams(data["streams"])
    if data.get("connections"):
        _print_connections(data["connections"])


def _print_connections(connections: list[dict[str, Any]]) -> None:
    """Connections workers lost (and got back): only those that were ever lost have a row."""

    def at(t: float | None) -> str:
        return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    ct = Table(
        "worker",
        "backend",
        "url",
        "state",
        "lost at",
        "attempts",
        "last error",
        "recovered at",
        "reconnects",
        title="Connections lost",
    )
    for c in connections:
        lost = c["state"] != "ok"
        ct.add_row(
            c["worker"],
            c["backend"],
            c["url"],
            "[red]lost[/red]" if lost else "[green]ok[/green]",
            at(c["lost_at"]),
            str(c["attempts"]),
            c["last_error"] or "",
            "" if lost else at(c["recovered_at"]),
            str(c["reconnects"]),
        )
    console.print(ct)


@app.command()
def trace(
    target: Annotated[str, typer.Argument(help="BUCKET/KEY of an input object.")],
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """What happened to this file: its events, attempts, outputs and rejects."""
    from .metrics import trace as trace_object

    p = _load(pipeline)
    bucket, key = _split_target(target)
    data = trace_object(p, bucket, key)
    if json_out:
        console.print_json(json.dumps(data, default=str))
        return
    if not data["versions"]:
        console.print(f"{target}: no event was ever raised for this object")
        raise typer.Exit(1)
    for v in data["versions"]:
        console.print(
            f"[bold]{target}[/bold] version {v['etag']} ({v['size']:,} bytes), "
            f"event {v['event_id']}"
        )
    for e in data["processing"]:
        info = e["info"]
        console.print(
            f"  {e['function']}: [bold]{e['status']}[/bold] after {e['attempts']} "
            f"attempt(s) {json.dumps(info.get('stats', {}))}"
        )
        for out in info.get("outputs", []):
            console.print(f"    → {out['bucket']}/{out['key']} ({out.get('rows', '?')} rows)")
        failure = info.get("last_failure")
        if failure:
            console.print(
                f"    last error: {failure.get('error_type')}: {failure.get('message')}",
                highlight=False,
            )
    for m in data["messages"]:
        where = "dead-lettered in" if m["queue"].endswith("-dlq") else "waiting in"
        console.print(
            f"  message {m['id']} {where} {m['queue']} (received {m['receive_count']} times)"
        )


queue_app = typer.Typer(help="Look at queues.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")


@queue_app.command("peek")
def queue_peek(
    name: Annotated[str, typer.Argument(help="Queue name.")],
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
    limit: int = 10,
) -> None:
    """Print messages waiting in a queue (bodies as JSON Lines) without taking them."""
    p = _load(pipeline)
    if name not in p.config.all_queue_names():
        known = ", ".join(p.config.all_queue_names())
        raise typer.BadParameter(f"unknown queue {name!r} (queues: {known})")
    for m in p.broker.queue(name).peek(limit):
        print(m.body)


table_app = typer.Typer(help="Look at tables.", no_args_is_help=True)
app.add_typer(table_app, name="table")


@table_app.command("scan")
def table_scan(
    name: Annotated[str, typer.Argument(help="Table name.")],
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
    limit: int = 20,
) -> None:
    """Print items of a table as JSON Lines."""
    p = _load(pipeline)
    if name not in p.tables:
        raise typer.BadParameter(f"unknown table {name!r} (tables: {', '.join(p.tables)})")
    for item in p.tables[name].scan(limit):
        print(json.dumps(item, ensure_ascii=False))


def _dlq_name(p: Pipeline, queue: str) -> str:
    if queue not in p.config.queues:
        known = ", ".join(p.config.queues) or "none"
        raise typer.BadParameter(f"unknown queue {queue!r} (queues: {known})")
    return p.config.dead_letter_queue(queue)


@dlq_app.command("list")
def dlq_list(
    queue: Annotated[str, typer.Argument(help="The source queue whose DLQ to show.")],
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
    limit: int = 100,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Dead-lettered messages of QUEUE, with the error that put them there."""
    p = _load(pipeline)
    messages = p.broker.queue(_dlq_name(p, queue)).peek(limit)
    if json_out:
        console.print_json(
            json.dumps(
                [
                    {
                        "id": m.id,
                        "receive_count": m.receive_count,
                        "failure": m.failure,
                        "body": json.loads(m.body),
                    }
                    for m in messages
                ]
            )
        )
        return
    console.print(f"[bold]{queue}[/bold]: {len(messages)} dead-lettered messages")
    for m in messages:
        try:
            detail = json.loads(m.body).get("detail", {})
            what = f"{detail['bucket']['name']}/{detail['object']['key']}"
        except (ValueError, KeyError, TypeError, AttributeError):
            what = m.body[:60]
        f = m.failure or {}
        console.print(
            f"\n[bold]{m.id}[/bold]  {what}  ({m.receive_count} receives)", highlight=False
        )
        console.print(
            f"  {f.get('error_type', '?')}: {f.get('message', '')}", highlight=False, soft_wrap=True
        )
    if messages:
        console.print(f"\n`sluiceway dlq show {queue} ID` shows one in full with its traceback")


@dlq_app.command("show")
def dlq_show(
    queue: Annotated[str, typer.Argument(help="The source queue whose DLQ to look in.")],
    message_id: Annotated[str, typer.Argument(help="The message id (from `dlq list`).")],
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
) -> None:
    """One dead-lettered message in full: its event and its failure record."""
    p = _load(pipeline)
    for m in p.broker.queue(_dlq_name(p, queue)).peek(1_000_000):
        if m.id == message_id:
            failure = dict(m.failure or {})
            tb = failure.pop("traceback", None)
            record = {
                "id": m.id,
                "receive_count": m.receive_count,
                "attributes": m.attributes,
                "failure": failure,
                "event": json.loads(m.body),
            }
            console.print_json(json.dumps(record, default=str))
            if tb:
                console.print("[bold]traceback[/bold]")
                console.print(tb, highlight=False, markup=False, soft_wrap=True)
            return
    err.print(f"no message {message_id!r} in the DLQ of {queue!r}")
    raise typer.Exit(1)


@dlq_app.command("redrive")
def dlq_redrive(
    queue: Annotated[str, typer.Argument(help="The source queue whose DLQ to redrive.")],
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
    ids: Annotated[list[str] | None, typer.Option("--id", help="Only these ids.")] = None,
    to: Annotated[str | None, typer.Option(help="Another queue to send them to.")] = None,
) -> None:
    """Move dead-lettered messages back to QUEUE (or --to another) for another try."""
    p = _load(pipeline)
    dlq = p.broker.queue(_dlq_name(p, queue))
    target = p.broker.queue(to or queue)
    moved = dlq.redrive(target, ids)
    console.print(f"redrove {moved} messages from {dlq.name} to {target.name}")


@dlq_app.command("purge")
def dlq_purge(
    queue: Annotated[str, typer.Argument(help="The source queue whose DLQ to empty.")],
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
) -> None:
    """Delete every dead-lettered message of QUEUE."""
    p = _load(pipeline)
    dlq = p.broker.queue(_dlq_name(p, queue))
    n = dlq.counts()
    total = n.visible + n.in_flight + n.delayed
    if not yes and not typer.confirm(f"delete {total} messages from {dlq.name}?"):
        raise typer.Exit(1)
    console.print(f"purged {dlq.purge()} messages from {dlq.name}")


# -- streams: ingest, append, compact ------------------------------------------

stream_app = typer.Typer(help="Append events to streams.", no_args_is_help=True)
app.add_typer(stream_app, name="stream")
APPEND_CHUNK = 5_000  # events per transaction: the write lock is never held for long


def _print_streams(streams: dict[str, Any]) -> None:
    table = Table(
        "stream",
        "function",
        "last seq",
        "checkpoint",
        "lag",
        "records",
        "duplicates",
        "written",
        title="Streams",
    )
    for name, s in streams.items():
        if not s["consumers"]:
            table.add_row(name, "", str(s["last_seq"]), "", "", "", "", "")
        for fn, c in s["consumers"].items():
            t = c["totals"]
            table.add_row(
                name,
                fn,
                str(s["last_seq"]),
                str(c["checkpoint"]),
                str(c["lag"]),
                f"{t.get('records', 0):,}",
                f"{t.get('duplicates', 0):,}",
                f"{t.get('written', 0):,}",
            )
    console.print(table)
    shards = Table("function", "shard", "committed seq", "unfinished flush", title="On Lambda")
    for s in streams.values():
        for fn, c in s["consumers"].items():
            for shard, st in c.get("lambda_shards", {}).items():
                pending = st["unfinished_flush"]
                shards.add_row(
                    fn, shard, st["committed"] or "", "" if pending is None else "..".join(pending)
                )
    if shards.row_count:
        console.print(shards)


@stream_app.command("put")
def stream_put(
    stream: Annotated[str, typer.Argument(help="The stream to append to.")],
    source: Annotated[str, typer.Argument(help="A JSON Lines file of events, or - for stdin.")],
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
) -> None:
    """Append events (JSON Lines) to STREAM; every line is checked before any is appended."""
    from .streams.events import events_batch, parse_json_lines

    p = _load(pipeline)
    target = p.stream(stream)
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise typer.BadParameter(f"{source}: no such file") from None
    except UnicodeDecodeError as e:
        raise SluicewayError(f"{source}: not UTF-8 (byte {e.start})") from None
    objs, lines = parse_json_lines(text)
    if not objs:
        raise SluicewayError(f"{source}: no events")
    events = events_batch(objs, lines)
    seqs: list[int] = []
    for i in range(0, events.num_rows, APPEND_CHUNK):
        seqs += target.append_events(events.slice(i, APPEND_CHUNK))
    console.print(f"appended {len(seqs)} events to {stream} (seqs {seqs[0]}..{seqs[-1]})")


@app.command()
def serve(
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0: every one).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 8080,
    tokens_file: Annotated[
        Path | None,
        typer.Option(help="Bearer tokens, one per line (also $SLUICEWAY_INGEST_TOKENS)."),
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (413).")] = 5 << 20,
    max_batch: Annotated[int, typer.Option(help="Most events per request (413).")] = 5_000,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "warning",
) -> None:
    """HTTP ingest: POST /streams/NAME with a bearer token; /healthz and /metrics are open."""
    from .ingest import TOKENS_ENV, load_tokens
    from .ingest import serve as run_server

    tokens = load_tokens(os.environ.get(TOKENS_ENV), tokens_file)

    def ready(bound: str, actual: int) -> None:
        typer.echo(f"listening on http://{bound}:{actual} (POST /streams/NAME)")
        sys.stdout.flush()

    run_server(
        pipeline,
        host=host,
        port=port,
        tokens=tokens,
        max_body_bytes=max_body_bytes,
        max_batch=max_batch,
        on_ready=ready,
        log_level=log_level,
    )


@app.command()
def compact(
    target: Annotated[str, typer.Argument(help="BUCKET or BUCKET/PREFIX of a dataset.")],
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
    small_mb: Annotated[float, typer.Option(help="Files under this many MiB are merged.")] = 32,
    target_rows: Annotated[int, typer.Option(help="Rows per merged file, at most.")] = 1_000_000,
    dry_run: Annotated[bool, typer.Option(help="Only say what would be merged.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Merge each partition's small files into one; readers never miss a row."""
    from .compact import compact as run_compact

    p = _load(pipeline)
    bucket, _, prefix = target.partition("/")
    report = run_compact(
        p,
        bucket,
        prefix,
        small_bytes=int(small_mb * (1 << 20)),
        target_rows=target_rows,
        dry_run=dry_run,
    )
    if json_out:
        console.print_json(json.dumps(report.to_dict()))
        return
    verb = "would merge" if dry_run else "merged"
    for m in report.merged:
        into = f" → {m['key']} ({m['rows']:,} rows)" if "key" in m else ""
        console.print(f"{verb} {len(m['inputs'])} files in {m['directory']}{into}")
    if report.removed_superseded:
        console.print(f"removed {len(report.removed_superseded)} superseded files")
    for s in report.skipped:
        console.print(f"[yellow]skipped[/yellow] {s}")
    if not report.merged and not report.removed_superseded:
        console.print("nothing to compact")


# -- AWS serverless: package, terraform, rehearse ---------------------------------------

deploy_app = typer.Typer(help="Deploy the pipeline to AWS serverless.", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")


def _mb(n: int) -> str:
    """Bytes in MB as Lambda's limits count them (250 MB = 262,144,000 bytes)."""
    return f"{n / (1 << 20):,.1f} MB"


@app.command()
def package(
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
    out: Annotated[Path, typer.Option(help="Where the zip (or image/) goes.")] = Path("dist"),
    image: Annotated[
        bool, typer.Option("--image", help="Write a container image definition instead.")
    ] = False,
    architecture: Annotated[str, typer.Option(help="Lambda's architecture: x86_64 or arm64.")] = (
        "x86_64"
    ),
    python: Annotated[str, typer.Option(help="The Lambda runtime's Python version.")] = "3.12",
    deps: Annotated[
        bool, typer.Option("--deps/--no-deps", help="Include Sluiceway's dependencies.")
    ] = True,
    requirement: Annotated[
        list[str] | None,
        typer.Option("--requirement", "-r", help="A package the pipeline's own code needs."),
    ] = None,
    slim: Annotated[bool, typer.Option(help="Leave out what a pipeline never loads.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="The report as JSON.")] = False,
) -> None:
    """Build the Lambda deployment zip and report its size against Lambda's limits."""
    from .aws.package import build_zip, write_image

    p = _load(pipeline)
    if image:
        report = write_image(
            p.path or pipeline,
            out,
            config=p.config,
            python_version=python,
            architecture=architecture,
            requirements=requirement or [],
        )
    else:
        with console.status("installing dependencies for Lambda and zipping…"):
            report = build_zip(
                p.path or pipeline,
                out,
                config=p.config,
                python_version=python,
                architecture=architecture,
                dependencies=deps,
                requirements=requirement or [],
                slim=slim,
            )
    if json_out:
        console.print_json(json.dumps(report.to_dict()))
    else:
        what = "image definition" if report.kind == "image" else "package"
        console.print(
            f"{what} [bold]{report.path}[/bold]: {report.files:,} files, Python "
            f"{report.python_version}, {report.architecture}"
        )
        t = Table("Lambda limit", "limit", "this package", "", title="Size")
        for lim in report.limits:
            mark = "[green]ok[/green]" if lim.ok else ("[red]too big[/red]" if lim.hard else "")
            t.add_row(lim.name, _mb(lim.limit), _mb(lim.size), mark)
        console.print(t)
        for lim in report.limits:
            if not lim.ok:
                console.print(f"{lim.name}: {lim.advice}")
        if report.largest:
            console.print(
                "largest: " + ", ".join(f"{n} {_mb(b)}" for n, b in report.largest[:5]),
                highlight=False,
            )
        for w in report.warnings:
            console.print(f"[yellow]note:[/yellow] {w}")
    if not report.ok:
        raise typer.Exit(1)


@deploy_app.command("terraform")
def deploy_terraform(
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
    out: Annotated[Path, typer.Option(help="The Terraform module's folder.")] = Path("infra"),
    region: Annotated[str | None, typer.Option(help="Default AWS region.")] = None,
    name_prefix: Annotated[
        str | None, typer.Option(help="Default name prefix (else the sqs:// prefix or PIPELINE-).")
    ] = None,
    lambda_zip: Annotated[
        str | None, typer.Option(help="The package, relative to --out (default ../dist/…).")
    ] = None,
) -> None:
    """Write a Terraform module with every AWS resource the pipeline needs."""
    from .aws.terraform import write_module

    p = _load(pipeline)
    zip_path = lambda_zip or os.path.relpath(
        Path("dist/sluiceway-lambda.zip").resolve(), out.resolve()
    )
    plan, files = write_module(
        p.config,
        out,
        pipeline_file=(p.path or pipeline).name,
        name_prefix=name_prefix,
        region=region,
        lambda_zip=zip_path,
    )
    console.print(
        f"wrote {', '.join(f.name for f in files)} to [bold]{out}[/bold]: "
        f"{len(plan.buckets)} buckets, {len(plan.rules)} rules, {len(plan.topics)} topics, "
        f"{len(plan.queues)} queues, {len(plan.streams)} streams, "
        f"{len(plan.functions) + len(plan.stream_functions)} functions, {len(plan.tables)} tables"
    )
    for w in plan.warnings:
        console.print(f"[yellow]note:[/yellow] {w}", highlight=False)
    console.print(f"next: terraform -chdir={out} init && terraform -chdir={out} apply")


@deploy_app.command("rehearse")
def deploy_rehearse(
    endpoint: Annotated[
        str, typer.Option(help="An AWS-compatible endpoint, e.g. http://127.0.0.1:5000 (moto).")
    ],
    put: Annotated[
        list[str] | None, typer.Option("--put", help="FILE=BUCKET/KEY to put once deployed.")
    ] = None,
    put_events: Annotated[
        list[str] | None,
        typer.Option(
            "--put-events", help="FILE=STREAM: JSON Lines events to PutRecords to a stream."
        ),
    ] = None,
    pipeline: PipelineOpt = DEFAULT_PIPELINE,
    region: Annotated[str, typer.Option(help="The region to create things in.")] = "us-east-1",
    prefix: Annotated[str | None, typer.Option(help="Name prefix (default: random).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for everything to settle.")] = (
        120.0
    ),
    deliver_wait: Annotated[
        float, typer.Option(help="Seconds before an undelivered event is delivered by hand.")
    ] = 3.0,
    keep: Annotated[bool, typer.Option(help="Keep the resources afterwards.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="The report as JSON.")] = False,
) -> None:
    """Create the AWS resources at ENDPOINT, drive files through them, and check the results."""
    from urllib.parse import urlsplit

    from .aws.rehearse import parse_events, parse_puts, rehearse

    try:
        puts = parse_puts(put or [])
        events = parse_events(put_events or [])
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if not puts and not events:
        raise typer.BadParameter("give --put FILE=BUCKET/KEY or --put-events FILE=STREAM")
    host = urlsplit(endpoint).hostname or ""
    if host in ("localhost", "::1") or host.startswith("127."):
        # An emulator on this machine takes any key; real AWS never sees these.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "rehearsal")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "rehearsal")
    with console.status("rehearsing…") as st:
        report = rehearse(
            pipeline,
            endpoint,
            puts,
            events=events,
            region=region,
            prefix=prefix,
            deliver_wait=deliver_wait,
            timeout=timeout,
            keep=keep,
            on_step=lambda s: st.update(f"rehearsing: {s}…"),
        )
    if json_out:
        console.print_json(json.dumps(report.to_dict(), default=str))
    else:
        console.print(f"created {len(report.created)} things at {report.endpoint}")
        for i in report.invocations:
            what = f"records of {i['shard']}" if "shard" in i else "messages"
            console.print(
                f"  invoked {i['function']} with {i['messages']} {what}: "
                f"{', '.join(i['statuses'])}",
                highlight=False,
            )
        for f in report.fallbacks:
            console.print(f"[yellow]fallback:[/yellow] {f}", highlight=False)
        for c in report.checks:
            mark = "[green]ok[/green]  " if c.ok else "[red]FAIL[/red]"
            console.print(f"{mark} {c.name} {c.detail}", highlight=False)
        for n in report.notes:
            console.print(f"[dim]note: {n}[/dim]", highlight=False)
        verdict = "[green]passed[/green]" if report.ok else "[red]failed[/red]"
        console.print(f"rehearsal {verdict} in {report.seconds:.1f}s")
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("SLUICEWAY_LOG", "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        app()
    except ConfigError as e:
        err.print("[red]pipeline file has problems:[/red]")
        for problem in e.problems:
            err.print(f"  {problem}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except SluicewayError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(1)
