"""What every networked backend does around its connection, written once.

The Redis, RabbitMQ, NATS, SQS, PostgreSQL and S3 backends each take a URL
with some options of ours mixed into the query, show that URL in messages
and logs with its secrets hidden, report a connection error on one line, and
wait between reconnect attempts with a doubling, jittered pause. They used to
carry their own copies of these; the copies had started to drift.

Only the standard library here: :mod:`sluiceway.backends` imports this, and
that module must stay cheap to import.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

# A query option whose name holds one of these is hidden in messages.
SECRET_WORDS = ("secret", "token", "password", "key")


def redact(url: str) -> str:
    """The URL with any password hidden, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def display_url(url: str) -> str:
    """The URL for messages: a password in the netloc and secret-looking options hidden."""
    parts = urlsplit(redact(url))
    query = urlencode(
        [
            (k, "***" if any(w in k.lower() for w in SECRET_WORDS) else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ],
        safe="*:/",
    )
    # Built by hand: urlunsplit drops the "//" of an empty netloc (sqs://?…).
    return f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{query}" if query else "")


def split_query(url: str, own: Collection[str]) -> tuple[str, dict[str, str], set[str]]:
    """``url`` without our own query parameters, those (decoded), and the names left.

    The rest of the query is kept byte for byte, in order: the client library
    decodes it itself (libpq, for one, decodes ``%XX`` but not ``+``), so
    re-encoding it could change a value.
    """
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    kept: list[str] = []
    theirs: set[str] = set()
    for item in parts.query.split("&") if parts.query else []:
        name, _, value = item.partition("=")
        if name in own:
            ours[name] = unquote(value)
        else:
            kept.append(item)
            theirs.add(unquote(name))
    return parts._replace(query="&".join(kept)).geturl(), ours, theirs


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (clients' messages span lines, with tabs)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Backoff:
    """The pause before the next reconnect attempt: doubling from ``first`` up to ``cap``.

    Jittered by default (a random point in the upper half of the pause), so
    workers that lost the server together do not come back in lockstep.
    ``current`` is the pause before jitter, for log lines.
    """

    def __init__(self, first: float = 0.05, cap: float = 2.0, *, jitter: bool = True) -> None:
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self.current = first

    def next(self) -> float:
        """How long to wait now; the pause after that is twice as long (up to ``cap``)."""
        pause = random.uniform(self.current / 2, self.current) if self.jitter else self.current
        self.current = min(self.current * 2, self.cap)
        return pause

    def reset(self) -> None:
        """After a success: the next failure waits ``first`` again."""
        self.current = self.first
