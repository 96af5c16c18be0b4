"""The pipeline file (``sluiceway.yaml``) into typed models, or every mistake at once.

Users edit this file by hand, so an error must say where: each problem is
reported as ``file:line: key.path: message``. Structure and types are checked
by pydantic; cross references (a rule target that is not a queue, a step
that writes to an unknown bucket, a pattern EventBridge would reject) are
checked after, against the same line map. Nothing runs until all of it is
right.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from .errors import ConfigError, PatternError
from .patterns import compile_pattern
from .yamlfile import Problems, load_yaml, plain

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``90``, ``"90s"``, ``"1.5m"``, ``"500ms"`` → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str) and (m := _DURATION_RE.match(value)):
        return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"expected a duration such as 30s, 5m or 1h, got {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Name = Annotated[str, Field(pattern=NAME_RE)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RetryConfig(_Model):
    max_receive_count: int | None = Field(None, ge=1)
    backoff_base: Duration | None = None
    backoff_max: Duration | None = None


class QueueConfig(_Model):
    visibility_timeout: Duration = 60.0
    max_receive_count: int = Field(5, ge=1)
    delay: Duration = 0.0
    dead_letter_queue: Name | None = None
    backoff_base: Duration = 1.0
    backoff_max: Duration = 300.0
    # The same three settings grouped: `retry: {max_receive_count, backoff_base, backoff_max}`.
    retry: RetryConfig | None = None

    @model_validator(mode="after")
    def _apply_retry(self) -> QueueConfig:
        if self.retry is not None:
            for field in ("max_receive_count", "backoff_base", "backoff_max"):
                value = getattr(self.retry, field)
                if value is not None:
                    setattr(self, field, value)
        if self.backoff_max < self.backoff_base:
            raise ValueError("backoff_max must not be smaller than backoff_base")
        return self


class TopicConfig(_Model):
    subscriptions: list[Name] = Field(min_length=1)


class RuleConfig(_Model):
    name: Name
    pattern: dict[str, Any]
    targets: list[Name] = Field(min_length=1)


class TableConfig(_Model):
    key: list[str] = Field(min_length=1)


class DestinationConfig(_Model):
    """Where a function sends its per-input summaries or its error messages."""

    queue: Name | None = None
    topic: Name | None = None


class StreamConfig(_Model):
    """A stream (Kinesis): ordered records that stream functions consume exactly once."""

    # Records every consuming function has committed are dropped after this
    # long (null: kept forever); unconsumed records are never dropped.
    retention: Duration | None = 7 * 86_400.0
    # One live consumer per stream function: its lease expires after this long
    # without renewal (a holder that died on this host is replaced at once).
    lease_timeout: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 30.0


class FunctionConfig(_Model):
    queue: Name | None = None
    stream: Name | None = None  # instead of a queue: consume a stream (see streams/)
    steps: list[dict[str, Any] | str] = Field(default_factory=list)
    handler: str | None = Field(
        None, pattern=r"^([A-Za-z_][\w.]*:[A-Za-z_]\w*|[A-Za-z0-9][\w.-]*)$"
    )
    timeout: Duration = 900.0
    batch_size: int = Field(1, ge=1, le=100)
    on_success: DestinationConfig | None = None
    on_error: DestinationConfig | None = None


class ProfileConfig(_Model):
    """Where the same pipeline runs: backend URLs instead of the embedded default.

    Secrets never go in the file: write ``${VAR}`` and set the variable.
    """

    buckets: dict[Name, str] = Field(default_factory=dict)
    broker: str | None = None  # queues and topics: redis://, amqp://, nats://, sqs://
    ledger: str | None = None  # postgresql://, redis://, dynamodb://
    tables: str | None = None  # postgresql://, dynamodb://
    streams: str | None = None
    notifications: str | None = None  # S3 event notifications: sqs://QUEUE?endpoint_url=…


class DiscoveryConfig(_Model):
    """How buckets without a directory watcher (S3) are polled; see ``poller.py``."""

    poll_interval: Annotated[float, BeforeValidator(parse_duration), Field(gt=0)] = 5.0
    # Each poll re-checks objects up to this much older than the newest seen (late
    # multipart uploads); null: check every object on every poll.
    lookback: Duration | None = 3600.0
    # Buckets whose new keys always sort after the old ones: list from the last key.
    start_after: list[Name] = Field(default_factory=list)


class PipelineConfig(_Model):
    pipeline: Name
    state_dir: str = ".sluiceway"
    # How long to wait for the state database when another process holds it.
    state_timeout: Duration = 30.0
    # full: objects written to local buckets are fsynced before the ledger may
    # say done, so an OS crash or power cut loses no committed output.
    # process: no fsync; every promise still holds across a crash of any
    # Sluiceway process (SIGKILL), the page cache keeps what was written.
    durability: Literal["full", "process"] = "full"
    imports: list[str] = Field(default_factory=list)
    buckets: dict[Name, str] = Field(default_factory=dict)
    topics: dict[Name, TopicConfig] = Field(default_factory=dict)
    queues: dict[Name, QueueConfig | None] = Field(default_factory=dict)
    streams: dict[Name, StreamConfig | None] = Field(default_factory=dict)
    tables: dict[Name, TableConfig] = Field(default_factory=dict)
    rules: list[RuleConfig] = Field(default_factory=list)
    functions: dict[Name, FunctionConfig] = Field(default_factory=dict)
    profiles: dict[Name, ProfileConfig] = Field(default_factory=dict)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)

    # Filled in by the loader, not by the file.
    base_dir: Path = Field(default=Path("."), exclude=True)
    source: str = Field(default="<string>", exclude=True)
    profile: str | None = Field(default=None, exclude=True)

    @property
    def backends(self) -> ProfileConfig:
        """The active profile's backend URLs (all embedded when there is none)."""
        return self.profiles[self.profile] if self.profile else ProfileConfig()

    def bucket_url(self, name: str) -> str:
        return self.backends.buckets.get(name, self.buckets[name])

    def queue_config(self, name: str) -> QueueConfig:
        return self.queues.get(name) or QueueConfig()

    def stream_config(self, name: str) -> StreamConfig:
        return self.streams.get(name) or StreamConfig()

    def dead_letter_queue(self, name: str) -> str:
        return self.queue_config(name).dead_letter_queue or f"{name}-dlq"

    def all_queue_names(self) -> list[str]:
        """Declared queues plus each one's dead-letter queue."""
        names = list(self.queues)
        for q in self.queues:
            dlq = self.dead_letter_queue(q)
            if dlq not in names:
                names.append(dlq)
        return names

    def resolve_path(self, value: str) -> Path:
        path = Path(value.removeprefix("file://"))
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def state_path(self) -> Path:
        return self.resolve_path(self.state_dir)


# -- locating problems in the file ---------------------------------------------


def _pydantic_problems(problems: Problems, err: ValidationError) -> None:
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # Union members add their class name to the location; drop those.
        loc = tuple(p for p in loc if p not in ("QueueConfig", "StreamConfig", "RetryConfig"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        elif e["type"] == "string_pattern_mismatch" and loc and loc[-1] == "handler":
            msg = "handler must be 'module:function' or a name registered with @handler"
        elif e["type"] == "string_pattern_mismatch":
            msg = "names use letters, digits, '.', '_' and '-', starting with a letter or digit"
        problems.add(loc, msg)


# -- cross references --------------------------------------------------------


def _check_references(cfg: PipelineConfig, problems: Problems) -> None:
    from .steps import STEPS, StepSpecError, parse_step
    from .steps.python import import_module, resolve_handler

    for i, module in enumerate(cfg.imports):
        try:
            import_module(module, cfg.base_dir)
        except ValueError as e:
            problems.add(("imports", i), str(e))

    queue_names = set(cfg.queues)
    for name, topic in cfg.topics.items():
        if name in queue_names:
            problems.add(("topics", name), "a topic and a queue cannot share a name")
        for i, sub in enumerate(topic.subscriptions):
            if sub not in queue_names:
                problems.add(("topics", name, "subscriptions", i), f"unknown queue {sub!r}")
    for name in cfg.queues:
        dlq = cfg.queue_config(name).dead_letter_queue
        if dlq is not None and dlq == name:
            problems.add(("queues", name, "dead_letter_queue"), "a queue cannot be its own DLQ")

    seen_rules: set[str] = set()
    for i, rule in enumerate(cfg.rules):
        if rule.name in seen_rules:
            problems.add(("rules", i, "name"), f"duplicate rule name {rule.name!r}")
        seen_rules.add(rule.name)
        for j, target in enumerate(rule.targets):
            if target not in queue_names and target not in cfg.topics:
                problems.add(
                    ("rules", i, "targets", j),
                    f"unknown target {target!r}: not a queue or topic of this pipeline",
                )
        try:
            compile_pattern(rule.pattern)
        except PatternError as e:
            problems.add(("rules", i, "pattern", *e.path), f"invalid event pattern: {e.message}")
            continue
        for j, value in enumerate(_bucket_names_in(rule.pattern)):
            if isinstance(value, str) and value not in cfg.buckets:
                problems.add(
                    ("rules", i, "pattern", "detail", "bucket", "name", j),
                    f"unknown bucket {value!r}",
                )

    for i, name in enumerate(cfg.discovery.start_after):
        if name not in cfg.buckets:
            problems.add(("discovery", "start_after", i), f"unknown bucket {name!r}")

    fed: dict[str, str] = {}
    for name, fn in cfg.functions.items():
        if fn.stream is not None or fn.queue is None:
            _check_stream_function(cfg, name, fn, problems)
        elif fn.queue not in queue_names:
            problems.add(("functions", name, "queue"), f"unknown queue {fn.queue!r}")
        elif fn.queue in fed:
            problems.add(
                ("functions", name, "queue"),
                f"queue {fn.queue!r} already feeds function {fed[fn.queue]!r}",
            )
        fed.setdefault(fn.queue, name)
        if not fn.steps and not fn.handler:
            problems.add(("functions", name), "give 'steps' or a 'handler'")
        if fn.steps and fn.handler:
            problems.add(("functions", name, "handler"), "give 'steps' or a 'handler', not both")
        for field in ("on_success", "on_error"):
            dest = getattr(fn, field)
            if dest is not None:
                _check_destination(cfg, dest, ("functions", name, field), problems)
        if fn.handler:
            try:
                resolve_handler(fn.handler, cfg.base_dir)
            except ValueError as e:
                problems.add(("functions", name, "handler"), str(e))
        for j, raw in enumerate(fn.steps):
            try:
                step_name, options = parse_step(raw)
                STEPS[step_name].check(options, cfg)
                if fn.stream is None and getattr(STEPS[step_name], "stream_only", False):
                    raise StepSpecError(
                        f"{step_name} works in stream functions only (give 'stream:', not "
                        "'queue:')",
                        (step_name,),
                    )
            except StepSpecError as e:
                problems.add(("functions", name, "steps", j, *e.path), e.message)


def _check_stream_function(
    cfg: PipelineConfig, name: str, fn: FunctionConfig, problems: Problems
) -> None:
    """A stream function: a known stream, steps (no handler), a dataset writer last."""
    from .steps import STEPS, StepSpecError, parse_step

    where = ("functions", name)
    if fn.stream is None:
        problems.add(where, "give 'queue' (messages) or 'stream' (a stream's records)")
        return
    if fn.queue is not None:
        problems.add((*where, "stream"), "give 'queue' or 'stream', not both")
    if fn.stream not in cfg.streams:
        known = ", ".join(sorted(cfg.streams)) or "none"
        problems.add((*where, "stream"), f"unknown stream {fn.stream!r} (streams: {known})")
    if fn.handler:
        problems.add((*where, "handler"), "stream functions take 'steps', not a 'handler'")
    for field in ("on_success", "on_error"):
        if getattr(fn, field) is not None:
            problems.add((*where, field), "not supported for stream functions yet")
    for j, raw in enumerate(fn.steps):
        try:
            step_type = STEPS[parse_step(raw)[0]]
        except StepSpecError:
            continue  # reported with the other step problems
        if step_type.source:
            problems.add(
                (*where, "steps", j),
                f"{step_type.name} reads objects; stream functions get their stream's records",
            )
        last = j == len(fn.steps) - 1
        if last and not getattr(step_type, "stream_sink", False):
            problems.add(
                (*where, "steps", j),
                "the last step of a stream function must be write_dataset (its flushes "
                "are committed exactly once)",
            )
        elif not last and getattr(step_type, "stream_sink", False):
            problems.add((*where, "steps", j), f"{step_type.name} must be the last step")


def _check_destination(
    cfg: PipelineConfig, dest: DestinationConfig, path: tuple[Any, ...], problems: Problems
) -> None:
    """A message destination: exactly one of a known queue or a known topic."""
    if (dest.queue is None) == (dest.topic is None):
        problems.add(path, "give exactly one of 'queue' or 'topic'")
    elif dest.queue is not None and dest.queue not in cfg.queues:
        problems.add((*path, "queue"), f"unknown queue {dest.queue!r}")
    elif dest.topic is not None and dest.topic not in cfg.topics:
        problems.add((*path, "topic"), f"unknown topic {dest.topic!r}")


def _bucket_names_in(pattern: dict[str, Any]) -> list[Any]:
    """Exact bucket names a rule's pattern asks for (to catch typos early)."""
    detail = pattern.get("detail")
    if not isinstance(detail, dict):
        return []
    bucket = detail.get("bucket")
    if not isinstance(bucket, dict):
        return []
    names = bucket.get("name")
    return names if isinstance(names, list) else []


# -- entry points --------------------------------------------------------------


def loads(
    text: str,
    *,
    source: str = "<string>",
    base_dir: Path | None = None,
    profile: str | None = None,
) -> PipelineConfig:
    """Parse and check a pipeline; raises ConfigError listing every problem."""
    doc = load_yaml(text, source)
    problems = Problems(source, doc)
    if not isinstance(doc, dict):
        problems.add((), "the pipeline file must be a mapping with 'pipeline:', 'queues:', …")
        problems.raise_if_any()
    try:
        cfg = PipelineConfig.model_validate(plain(doc))
    except ValidationError as err:
        _pydantic_problems(problems, err)
        problems.raise_if_any()
        raise  # unreachable: there was at least one error
    cfg.base_dir = (base_dir or Path.cwd()).resolve()
    cfg.source = source
    _check_references(cfg, problems)
    _check_profiles(cfg, problems)
    problems.raise_if_any()
    if profile is not None:
        return _activate(cfg, profile, source)
    return cfg


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def missing_env(url: str) -> list[str]:
    return [v for v in _ENV_REF.findall(url) if v not in os.environ]


def expand_env(url: str) -> str:
    """``${VAR}`` → its value; the loader has already checked that each is set."""
    return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), ""), url)


def _profile_urls(profile: ProfileConfig) -> list[str]:
    urls = [u for u in (profile.broker, profile.ledger, profile.tables, profile.streams) if u]
    urls += [profile.notifications] if profile.notifications else []
    return urls + list(profile.buckets.values())


def _check_profiles(cfg: PipelineConfig, problems: Problems) -> None:
    for name, profile in cfg.profiles.items():
        for bucket in profile.buckets:
            if bucket not in cfg.buckets:
                problems.add(("profiles", name, "buckets", bucket), f"unknown bucket {bucket!r}")
        fields = {
            "broker": profile.broker,
            "ledger": profile.ledger,
            "tables": profile.tables,
            "streams": profile.streams,
            "notifications": profile.notifications,
        }
        fields.update({f"buckets.{b}": u for b, u in profile.buckets.items()})
        for field, url in fields.items():
            if url and _has_literal_password(url):
                problems.add(
                    ("profiles", name, *field.split(".")),
                    "a password in the file; write ${VARIABLE} and set it in the environment",
                )


def _has_literal_password(url: str) -> bool:
    netloc = urlsplit(url).netloc
    if "@" not in netloc:
        return False
    userinfo = netloc.rsplit("@", 1)[0]
    if ":" not in userinfo:
        return False
    password = userinfo.split(":", 1)[1]
    return bool(password) and not _ENV_REF.fullmatch(password)


def load(path: str | Path, profile: str | None = None) -> PipelineConfig:
    """Load a pipeline file; ``profiles.yaml`` beside it adds profiles.

    ``profile`` (or ``$SLUICEWAY_PROFILE``) picks the backends to run on.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such pipeline file"]) from None
    profile = profile or os.environ.get("SLUICEWAY_PROFILE") or None
    extra = path.resolve().parent / "profiles.yaml"
    cfg = loads(text, source=str(path), base_dir=path.resolve().parent)
    if extra.exists():
        cfg.profiles.update(_load_profiles(extra, cfg))
    return _activate(cfg, profile, str(path)) if profile else cfg


def _load_profiles(path: Path, cfg: PipelineConfig) -> dict[str, ProfileConfig]:
    doc = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    problems = Problems(str(path), doc)
    out: dict[str, ProfileConfig] = {}
    for name, raw in doc.items() if isinstance(doc, dict) else []:
        if name in cfg.profiles:
            problems.add((name,), f"profile {name!r} is also defined in {cfg.source}")
            continue
        try:
            out[str(name)] = ProfileConfig.model_validate(plain(raw))
        except ValidationError as err:
            for e in err.errors():
                problems.add((name, *e["loc"]), e["msg"])
    check = cfg.model_copy(update={"profiles": out})
    _check_profiles(check, problems)
    problems.raise_if_any()
    return out


def _activate(cfg: PipelineConfig, profile: str, source: str) -> PipelineConfig:
    if profile not in cfg.profiles:
        known = ", ".join(sorted(cfg.profiles)) or "none defined"
        raise ConfigError([f"{source}: unknown profile {profile!r} (profiles: {known})"])
    missing = sorted({v for url in _profile_urls(cfg.profiles[profile]) for v in missing_env(url)})
    if missing:
        raise ConfigError(
            [f"{source}: profile {profile!r} needs environment variables: {', '.join(missing)}"]
        )
    cfg.profile = profile
    return cfg
