"""The helpers every networked backend shares: URL options, hidden secrets, errors, backoff."""

from __future__ import annotations

import pytest

from sluiceway.connections import Backoff, display_url, one_line, redact, split_query


def test_split_query_takes_ours_and_keeps_the_rest_byte_for_byte() -> None:
    rest, ours, theirs = split_query("amqp://h/v?heartbeat=5&prefix=a%2Eb&x=1+2", ("prefix",))
    assert rest == "amqp://h/v?heartbeat=5&x=1+2"
    assert ours == {"prefix": "a.b"} and theirs == {"heartbeat", "x"}
    assert split_query("nats://h:4222", ("prefix",)) == ("nats://h:4222", {}, set())


def test_secrets_are_hidden_in_the_netloc_and_the_query() -> None:
    assert redact("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    shown = display_url("redis://:pw@h:6379/0?password=pw2&ssl_keyfile=k&db=1")
    assert "pw" not in shown and "ssl_keyfile=***" in shown and "db=1" in shown
    assert display_url("sqs://?region=us-east-1") == "sqs://?region=us-east-1"


def test_one_line_names_the_error_type() -> None:
    assert one_line(OSError("refused\n\tby peer")) == "OSError: refused by peer"
    assert one_line(TimeoutError()) == "TimeoutError"


@pytest.mark.parametrize("jitter", [False, True])
def test_backoff_doubles_up_to_its_cap_and_starts_over_after_a_reset(jitter: bool) -> None:
    b = Backoff(0.1, 0.5, jitter=jitter)
    pauses = [b.next() for _ in range(5)]
    for pause, full in zip(pauses, [0.1, 0.2, 0.4, 0.5, 0.5], strict=True):
        assert full / 2 <= pause <= full if jitter else pause == full
    b.reset()
    assert b.current == 0.1
