"""boto3 clients for the AWS backends (SQS/SNS broker, DynamoDB ledger and tables).

One place parses the ``sqs://`` and ``dynamodb://`` profile URLs, builds
clients with the same retry policy, and turns "nothing answers at that
endpoint" into one error that says which URL (secrets hidden), which call was
tried and how often. Credentials never come from the URL: boto3's standard
chain finds them (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, an instance or task role), so a pipeline file can be
committed as it is.

Common URL options (query parameters):

``endpoint_url``
    Talk to this endpoint instead of AWS (moto, LocalStack, a VPC endpoint).
``region``
    The region to sign for (default: the chain's, e.g. ``AWS_DEFAULT_REGION``).
``max_attempts``
    Attempts per call, including the first (botocore's *standard* retry mode:
    exponential backoff with jitter on throttling, 5xx and connection errors).
    Default 5.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from . import health
from .config import parse_duration
from .connections import Backoff, display_url
from .errors import ConfigError, SluicewayError

T = TypeVar("T")

COMMON_OPTIONS = ("endpoint_url", "region", "max_attempts")
DEFAULT_MAX_ATTEMPTS = 5
# The start-up probe fails fast: three attempts, short connect timeout.
PROBE_ATTEMPTS = 3
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class AwsUnavailable(SluicewayError):
    """An AWS endpoint cannot be reached or refuses us (at start, or after all retries)."""


@dataclass(frozen=True)
class AwsTarget:
    """An ``sqs://`` or ``dynamodb://`` URL, split into client settings and options."""

    scheme: str
    display: str  # for messages: secrets hidden
    endpoint_url: str | None
    region: str | None
    max_attempts: int
    options: Mapping[str, str] = field(default_factory=dict)

    def where(self) -> str:
        """Where the service is, for messages."""
        if self.endpoint_url:
            return self.endpoint_url
        return f"the AWS endpoint of region {self.region or '(from the AWS configuration)'}"

    def flag(self, name: str, default: bool = False) -> bool:
        raw = self.options.get(name)
        if raw is None or raw == "":
            return default
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError([f"{self.display}: {name} must be true or false, got {raw!r}"])

    def duration(self, name: str) -> float | None:
        raw = self.options.get(name)
        if raw is None or raw == "":
            return None
        try:
            return parse_duration(raw)
        except ValueError as e:
            raise ConfigError([f"{self.display}: {name}: {e}"]) from None


def parse_url(url: str, scheme: str, own_options: Sequence[str]) -> AwsTarget:
    """Parse ``SCHEME://?endpoint_url=…&region=…&<own options>``; ConfigError on mistakes."""
    display = display_url(url)
    parts = urlsplit(url)
    if parts.scheme.lower() != scheme:
        raise ConfigError([f"{display}: expected a {scheme}:// URL"])
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            [
                f"{display}: credentials never go in the URL; boto3 finds them in the "
                "environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) "
                "or an instance/task role"
            ]
        )
    if parts.netloc or parts.path.strip("/"):
        raise ConfigError(
            [
                f"{display}: nothing goes between {scheme}:// and '?'; write "
                f"{scheme}://?region=REGION&… (and endpoint_url=… for an emulator)"
            ]
        )
    known = (*COMMON_OPTIONS, *own_options)
    opts: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k not in known:
            raise ConfigError([f"{display}: unknown option {k!r} (known: {', '.join(known)})"])
        opts[k] = v
    raw_attempts = opts.get("max_attempts") or str(DEFAULT_MAX_ATTEMPTS)
    if not raw_attempts.isdigit() or int(raw_attempts) < 1:
        raise ConfigError([f"{display}: max_attempts must be a whole number of at least 1"])
    return AwsTarget(
        scheme=scheme,
        display=display,
        endpoint_url=opts.get("endpoint_url") or None,
        region=opts.get("region") or None,
        max_attempts=int(raw_attempts),
        options={k: v for k, v in opts.items() if k not in COMMON_OPTIONS},
    )


_loader_lock = threading.Lock()
_loader: Any = None


def session() -> Any:
    """A new boto3 session sharing one botocore data loader with every other.

    Sessions are not thread-safe but cheap once the service JSON is parsed;
    the loader caches that parse once per process (it costs ~0.5 s).
    """
    global _loader
    try:
        import boto3
        import botocore.loaders
        import botocore.session
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            f"the AWS backends need boto3 ({e}): pip install 'sluiceway[aws]'"
        ) from None
    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        core = botocore.session.get_session()
        core.register_component("data_loader", _loader)
        return boto3.session.Session(botocore_session=core)


def make_client(
    service: str,
    target: AwsTarget,
    *,
    max_attempts: int | None = None,
    read_timeout: float = 60.0,
    connect_timeout: float = 5.0,
    sess: Any = None,
) -> Any:
    """A boto3 client (thread-safe once made) with botocore's standard retries."""
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts or target.max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=20,
        user_agent_extra="sluiceway",
    )
    client = (sess or session()).client(
        service, endpoint_url=target.endpoint_url, region_name=target.region, config=config
    )
    return watch_client(client, service, target.display)


def watch_client(client: Any, backend: str, display: str) -> Any:
    """Report the client's lost connections (and their end) to :mod:`sluiceway.health`.

    botocore retries a call itself, with backoff, so the only place that sees
    each failed attempt is its ``needs-retry`` event, which fires after every
    attempt. The handler returns None, so it never changes the retry decision.
    """
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    def on_attempt(caught_exception: BaseException | None = None, **_: Any) -> None:
        if caught_exception is None:
            health.ok(backend, display)
        elif isinstance(caught_exception, BotoConnectionError | HTTPClientError):
            health.lost(backend, display, caught_exception)

    client.meta.events.register("needs-retry", on_attempt)
    return client


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


_AUTH_CODES = {
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "AccessDeniedException",
    "ExpiredToken",
    "ExpiredTokenException",
    "AuthorizationError",
}


def probe(
    service: str,
    target: AwsTarget,
    what: str,
    call: Callable[[Any], object],
    call_name: str,
    sess: Any = None,
) -> None:
    """Make one cheap call with few retries; raise one AwsUnavailable saying what failed.

    Run at start so a wrong endpoint, region or credential is one clear error
    instead of a stack trace from the first worker that happens to need it.
    """
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        NoRegionError,
    )

    client = make_client(
        service,
        target,
        max_attempts=min(PROBE_ATTEMPTS, target.max_attempts),
        connect_timeout=3.0,
        read_timeout=10.0,
        sess=sess,
    )
    started = time.monotonic()
    try:
        call(client)
    except NoRegionError:
        raise AwsUnavailable(
            f"the {what} at {target.display} needs a region: add ?region=… to the URL "
            "or set AWS_DEFAULT_REGION"
        ) from None
    except NoCredentialsError:
        raise AwsUnavailable(
            f"the {what} at {target.display}: no AWS credentials found; set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        ) from None
    except ClientError as e:
        code = error_code(e)
        if code in _AUTH_CODES:
            raise AwsUnavailable(
                f"{service} at {target.where()} refused the credentials for the {what} "
                f"({target.display}): {code}: {e}"
            ) from None
        raise
    except BotoCoreError as e:
        raise AwsUnavailable(
            f"cannot reach {service} for the {what} at {target.where()} (URL {target.display}): "
            f"tried {call_name} {min(PROBE_ATTEMPTS, target.max_attempts)} times over "
            f"{time.monotonic() - started:.1f}s, last error: {e}. Is the endpoint running and "
            "reachable from here? Check the profile's URL."
        ) from None
    finally:
        client.close()


def retry_unprocessed(
    send: Callable[[list[T]], list[T]], items: list[T], what: str, attempts: int = 8
) -> None:
    """Call ``send`` until it returns nothing left over, backing off between rounds.

    For batch APIs that succeed partially (DynamoDB's UnprocessedItems, SQS's
    failed entries that are not the sender's fault): botocore retries whole
    failed calls, not the unprocessed part of a successful one.
    """
    backoff = Backoff(jitter=False)
    left = items
    for attempt in range(attempts):
        left = send(left)
        if not left:
            return
        if attempt < attempts - 1:
            time.sleep(backoff.next())
    raise AwsUnavailable(f"{what}: {len(left)} items still unprocessed after {attempts} attempts")


# -- DynamoDB, shared by the ledger and the tables ---------------------------------

# One URL serves the ledger and the tables, so both accept both options
# (``sent_ttl`` only means something to the ledger).
DYNAMO_OPTIONS = ("table_prefix", "sent_ttl")
_TABLE_NAME_RE = r"^[A-Za-z0-9_.-]{3,255}$"


class Dynamo:
    """One DynamoDB client plus the chores both DynamoDB backends need.

    Tables are created on first use (on-demand billing, so there is no
    capacity to plan) and waited for until they and their indexes are
    ACTIVE; several processes starting at once all wait for the one table.
    Batch calls repeat what DynamoDB left unprocessed, with backoff.
    """

    def __init__(self, target: AwsTarget, what: str) -> None:
        self.target = target
        self.what = what
        self.table_prefix = target.options.get("table_prefix", "")
        if self.table_prefix and not re.match(r"^[A-Za-z0-9_.-]+$", self.table_prefix):
            raise ConfigError(
                [f"{target.display}: table_prefix may hold only letters, digits, '_', '-' and '.'"]
            )
        self._session = session()
        self._probed = False
        self.client = make_client("dynamodb", target, sess=self._session)

    @classmethod
    def from_url(cls, url: str, what: str) -> Dynamo:
        return cls(parse_url(url, "dynamodb", DYNAMO_OPTIONS), what)

    def table_name(self, *parts: str) -> str:
        name = self.table_prefix + "-".join(parts)
        if not re.match(_TABLE_NAME_RE, name):
            raise ConfigError(
                [
                    f"{self.target.display}: {name!r} is no valid DynamoDB table name "
                    "(3 to 255 letters, digits, '_', '-' and '.')"
                ]
            )
        return name

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run one call; botocore has retried it already, so say what failed and where."""
        from botocore.exceptions import BotoCoreError

        try:
            return fn()
        except BotoCoreError as e:
            raise AwsUnavailable(
                f"DynamoDB at {self.target.where()} ({self.target.display}): {what} failed "
                f"after {self.target.max_attempts} attempts: {e}"
            ) from e

    def _probe(self, table: str) -> None:
        """Check the endpoint once, on the first table used, with DescribeTable on it.

        DescribeTable can be granted on the table alone, so the IAM policy
        needs no unscoped action (ListTables can only be granted on "*"). A
        missing table still proves the endpoint, region and credentials work.
        """
        from botocore.exceptions import ClientError

        def describe(c: Any) -> None:
            try:
                c.describe_table(TableName=table)
            except ClientError as e:
                if error_code(e) != "ResourceNotFoundException":
                    raise

        probe(
            "dynamodb",
            self.target,
            self.what,
            describe,
            f"DynamoDB DescribeTable {table}",
            sess=self._session,
        )
        self._probed = True

    def exists(self, name: str) -> bool:
        """Whether table ``name`` is there (for readers that must not create it)."""
        from botocore.exceptions import ClientError

        if not self._probed:
            self._probe(name)
        try:
            self.call(lambda: self.client.describe_table(TableName=name), f"describe {name}")
        except ClientError as e:
            if error_code(e) != "ResourceNotFoundException":
                raise
            return False
        return True

    def ensure_table(
        self,
        name: str,
        keys: Sequence[tuple[str, str, str]],
        indexes: Sequence[Mapping[str, Any]] = (),
        ttl_attribute: str | None = None,
        timeout: float = 300.0,
    ) -> None:
        """Create table ``name`` unless it exists, then wait until it can be used.

        ``keys``: (attribute, HASH|RANGE, S|N|B) for the table and every index
        key; ``indexes``: GlobalSecondaryIndexes as CreateTable takes them.
        """
        from botocore.exceptions import ClientError

        if not self._probed:
            self._probe(name)
        c = self.client
        try:
            self.call(lambda: c.describe_table(TableName=name), f"describe table {name}")
        except ClientError as e:
            if error_code(e) != "ResourceNotFoundException":
                raise
            types = {attr: kind for attr, _, kind in keys}
            args: dict[str, Any] = {
                "TableName": name,
                "BillingMode": "PAY_PER_REQUEST",
                "KeySchema": [
                    {"AttributeName": attr, "KeyType": role}
                    for attr, role, _ in keys
                    if role in ("HASH", "RANGE")
                ],
                "AttributeDefinitions": [
                    {"AttributeName": a, "AttributeType": t} for a, t in types.items()
                ],
            }
            if indexes:
                args["GlobalSecondaryIndexes"] = list(indexes)
            try:
                self.call(lambda: c.create_table(**args), f"create table {name}")
            except ClientError as e2:
                if error_code(e2) != "ResourceInUseException":  # another process was first
                    raise
        deadline = time.monotonic() + timeout
        while True:
            table = self.call(lambda: c.describe_table(TableName=name), f"describe {name}")["Table"]
            statuses = [table.get("TableStatus")] + [
                i.get("IndexStatus") for i in table.get("GlobalSecondaryIndexes", [])
            ]
            if all(s == "ACTIVE" for s in statuses):
                break
            if time.monotonic() > deadline:
                raise AwsUnavailable(f"DynamoDB table {name} not ACTIVE after {timeout:.0f}s")
            time.sleep(0.5)
        if ttl_attribute is not None:
            self._enable_ttl(name, ttl_attribute)

    def _enable_ttl(self, name: str, attribute: str) -> None:
        from botocore.exceptions import ClientError

        c = self.client
        current = self.call(lambda: c.describe_time_to_live(TableName=name), f"TTL of {name}")
        status = current.get("TimeToLiveDescription", {}).get("TimeToLiveStatus")
        if status in ("ENABLED", "ENABLING"):
            return
        try:
            self.call(
                lambda: c.update_time_to_live(
                    TableName=name,
                    TimeToLiveSpecification={"Enabled": True, "AttributeName": attribute},
                ),
                f"enable TTL on {name}",
            )
        except ClientError as e:  # another process is enabling it right now
            if error_code(e) != "ValidationException":
                raise

    def batch_write(self, table: str, requests: list[dict[str, Any]]) -> None:
        """``BatchWriteItem`` in 25s, repeating UnprocessedItems with backoff."""

        def send(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
            reply = self.call(
                lambda: self.client.batch_write_item(RequestItems={table: chunk}),
                f"write to {table}",
            )
            return list(reply.get("UnprocessedItems", {}).get(table, []))

        for i in range(0, len(requests), 25):
            retry_unprocessed(send, requests[i : i + 25], f"write to DynamoDB table {table}")

    def batch_get(self, table: str, keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``BatchGetItem`` (strongly consistent) in 100s; the items found, in no order."""
        found: list[dict[str, Any]] = []

        def fetch(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
            reply = self.call(
                lambda: self.client.batch_get_item(
                    RequestItems={table: {"Keys": chunk, "ConsistentRead": True}}
                ),
                f"read from {table}",
            )
            found.extend(reply.get("Responses", {}).get(table, []))
            return list(reply.get("UnprocessedKeys", {}).get(table, {}).get("Keys", []))

        for i in range(0, len(keys), 100):
            retry_unprocessed(fetch, keys[i : i + 100], f"read from DynamoDB table {table}")
        return found

    def pages(self, operation: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """Every page of a Query or Scan (following LastEvaluatedKey)."""
        method = getattr(self.client, operation)
        start: dict[str, Any] | None = None
        while True:
            args = dict(kwargs)
            if start is not None:
                args["ExclusiveStartKey"] = start
            page = self.call(lambda a=args: method(**a), f"{operation} on {kwargs['TableName']}")
            yield page
            start = page.get("LastEvaluatedKey")
            if not start:
                return

    def close(self) -> None:
        self.client.close()
