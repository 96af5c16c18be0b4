"""What the SQS/SNS broker does beyond the queue contract (tests/contract/test_queues.py).

Queue set-up (native redrive, the file winning over an existing queue),
failure records that travel by copy, leases on receipts, the supervisor's
receipt-only failure record, paging peeks and redrive by id, foreign
messages, FIFO queues and topics, and the one clear error for a wrong URL.
All against moto, reset before each test.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest

from sluiceway.errors import ConfigError
from sluiceway.queues.base import Message, OutgoingMessage, QueueSpec

from .aws_backend import client, fresh_prefix, sqs_url
from .services import free_port

pytest.importorskip("boto3")

SPECS = {
    "q": QueueSpec("q", visibility_timeout=1, max_receive_count=3, dead_letter_queue="q-dlq"),
    "q-dlq": QueueSpec("q-dlq"),
    "other": QueueSpec("other"),
}


def broker(aws: str, prefix: str | None = None, specs: Any = None, **options: str) -> Any:
    from sluiceway.queues.sqs import SqsBroker

    return SqsBroker.from_url(
        sqs_url(aws, prefix if prefix is not None else fresh_prefix(), **options),
        specs or SPECS,
        {"fanout": ["q", "other"]},
    )


def attributes_of(aws: str, url: str) -> dict[str, str]:
    return client("sqs", aws).get_queue_attributes(QueueUrl=url, AttributeNames=["All"])[
        "Attributes"
    ]


def test_unreachable_endpoint_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from sluiceway.aws_clients import AwsUnavailable

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(AwsUnavailable) as e:
        broker(url, "p-")
    assert time.monotonic() - started < 15
    text = str(e.value)
    assert f"sqs://?endpoint_url={url}&region=us-east-1&prefix=p-" in text
    assert "ListQueues 3 times" in text and "Could not connect" in text


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("sqs://key:secret@?region=us-east-1", "credentials never go in the URL"),
        ("sqs://eu-west-1?prefix=x", "nothing goes between"),
        ("sqs://?region=us-east-1&colour=blue", "unknown option 'colour'"),
        ("sqs://?region=us-east-1&max_attempts=0", "max_attempts"),
    ],
)
def test_url_mistakes_are_config_errors(url: str, problem: str) -> None:
    from sluiceway.queues.sqs import SqsBroker

    with pytest.raises(ConfigError, match=problem) as e:
        SqsBroker.from_url(url, SPECS, {})
    assert "secret" not in str(e.value)


def test_names_sqs_refuses_are_config_errors(aws: str) -> None:
    with pytest.raises(ConfigError, match=r"queue 'a\.b' becomes 'x-a\.b'"):
        broker(aws, "x-", {"a.b": QueueSpec("a.b")})
    with pytest.raises(ConfigError, match="fifo must be true or false"):
        broker(aws, fifo="maybe")


def test_queues_get_native_redrive_and_the_file_wins_over_an_existing_queue(aws: str) -> None:
    b = broker(aws, "p-")
    q, dlq = b.queue("q"), b.queue("q-dlq")
    assert q.url.endswith("/p-q") and dlq.url.endswith("/p-q-dlq")
    attrs = attributes_of(aws, q.url)
    assert attrs["VisibilityTimeout"] == "1" and attrs["MessageRetentionPeriod"] == "1209600"
    policy = json.loads(attrs["RedrivePolicy"])
    assert policy["deadLetterTargetArn"] == dlq.arn and int(policy["maxReceiveCount"]) == 3
    assert "RedrivePolicy" not in attributes_of(aws, dlq.url)

    changed = dict(SPECS, q=QueueSpec("q", 7.5, 4, 0.2, "q-dlq"))
    b2 = broker(aws, "p-", changed)  # CreateQueue says "exists with other attributes"
    assert b2.queue("q").url == q.url
    attrs = attributes_of(aws, q.url)
    assert (attrs["VisibilityTimeout"], attrs["DelaySeconds"]) == ("8", "1")  # rounded up
    assert int(json.loads(attrs["RedrivePolicy"])["maxReceiveCount"]) == 4


def test_failure_record_travels_by_copy_and_the_receive_count_goes_on(aws: str) -> None:
    q = broker(aws).queue("q")
    sqs = client("sqs", aws)
    mid = q.send("work", attributes={"k": "v"})
    [m] = q.receive(1)
    sent_at = m.sent_at
    for attempt in (1, 2):
        assert m.receive_count == attempt
        assert q.record_failure(m, {"error_type": "E", "message": f"boom {attempt}"}, 0.2)
        c = q.counts()
        assert (c.visible, c.in_flight, c.delayed) == (0, 0, 1)  # the copy, delayed 1 s
        assert q.receive(1) == []
        [m] = q.receive(1, wait=3)
        assert (m.id, m.body, m.attributes, m.sent_at) == (mid, "work", {"k": "v"}, sent_at)
        assert m.failure == {"error_type": "E", "message": f"boom {attempt}"}
    assert m.receive_count == 3
    assert q.record_failure(m, {"error_type": "E", "message": "boom 3"}, 0)
    # The 4th receive: past max_receive_count (3) while SQS's own count is back
    # at 1 (each copy starts afresh), so the queue moves it itself, failure and all.
    assert q.receive(1, wait=1) == []
    [dead] = q._broker.queue("q-dlq").peek()
    assert dead.id == mid and dead.receive_count == 3
    assert dead.failure == {"error_type": "E", "message": "boom 3"}
    assert dead.attributes == {
        "k": "v",
        "source_queue": "q",
        "dead_lettered_at": pytest.approx(time.time(), abs=30),
    }
    raw = sqs.receive_message(QueueUrl=q.url, WaitTimeSeconds=0)
    assert "Messages" not in raw  # nothing left behind in the source queue


def test_a_lapsed_receipt_changes_nothing(aws: str) -> None:
    q = broker(aws).queue("q")
    q.send("slow")
    [m] = q.receive(1)
    time.sleep(1.05)  # past the 1 s visibility timeout: someone else may have it now
    assert not q.change_visibility(m, 10)
    assert not q.record_failure(m, {"error_type": "E"}, 0)
    assert q.ack([m]) == 0
    [again] = q.receive(1, wait=2)
    assert again.id == m.id and again.receive_count == 2 and again.failure is None
    assert q.ack([again]) == 1


def test_the_supervisors_receipt_only_record_makes_the_message_visible_again(aws: str) -> None:
    prefix = fresh_prefix()
    worker_side = broker(aws, prefix).queue("q")
    supervisor_side = broker(aws, prefix).queue("q")  # another process: knows only the receipt
    worker_side.send("dies")
    [m] = worker_side.receive(1)
    stub = Message(m.id, "q", "", {}, 0, m.receipt, 0.0)
    assert supervisor_side.record_failure(stub, {"error_type": "WorkerDied"}, retry_in=0)
    [again] = worker_side.receive(1, wait=2)
    assert again.id == m.id and again.receive_count == 2 and again.body == "dies"


def test_peek_pages_through_a_big_dlq_and_redrive_picks_by_id(aws: str) -> None:
    b = broker(aws)
    q, dlq, other = b.queue("q"), b.queue("q-dlq"), b.queue("other")
    ids = q.send_batch([OutgoingMessage(f"m{i}", id=f"id-{i}") for i in range(25)])
    got = q.receive(25)
    assert [m.id for m in got] == ids
    for m in got:
        q.dead_letter(m, {"error_type": "E", "message": m.body})
    listed = dlq.peek(100)
    assert [m.id for m in listed] == ids  # every one once, not the first ten again
    assert all(m.receipt == "" and m.receive_count == 1 for m in listed)
    assert [m.id for m in dlq.peek(5)] == ids[:5]
    assert dlq.counts().visible == 25  # peeking hid nothing for good

    assert dlq.redrive(other, ["id-3", "id-24", "id-unknown"]) == 2
    back = other.receive(10)
    assert sorted(m.id for m in back) == ["id-24", "id-3"]
    assert all(m.receive_count == 1 and m.failure is not None for m in back)
    assert dlq.counts().visible == 23
    assert dlq.purge() == 23


def test_peeking_a_source_queue_is_refused_because_it_would_count(
    aws: str, caplog: pytest.LogCaptureFixture
) -> None:
    q = broker(aws).queue("q")
    q.send("x")
    with caplog.at_level(logging.WARNING, logger="sluiceway.sqs"):
        assert q.peek() == []
    assert "counts towards its redrive policy" in caplog.text
    [m] = q.receive(1)
    assert m.receive_count == 1  # the refused peek did not receive it


def test_messages_from_other_producers_are_read(aws: str) -> None:
    q = broker(aws).queue("other")
    sent = client("sqs", aws).send_message(
        QueueUrl=q.url,
        MessageBody='{"hello": 1}',
        MessageAttributes={
            "kind": {"DataType": "String", "StringValue": "ping"},
            "n": {"DataType": "Number", "StringValue": "3"},
        },
    )
    [m] = q.receive(1)
    assert m.id == sent["MessageId"] and m.body == '{"hello": 1}'
    assert m.attributes == {"kind": "ping", "n": 3} and m.failure is None


def test_topic_publish_keeps_ids_and_attributes_through_sns(aws: str) -> None:
    b = broker(aws)
    b.publish("fanout", [OutgoingMessage("e", {"a": [1, 2]}, id="ev-1")] * 2 + [])
    for name in ("q", "other"):
        [m] = b.queue(name).receive(10)
        assert (m.id, m.body, m.attributes) == ("ev-1", "e", {"a": [1, 2]})
    with pytest.raises(KeyError):
        b.publish("nope", [OutgoingMessage("x")])


def test_fifo_queues_and_topics(aws: str) -> None:
    b = broker(aws, "f-", fifo="true")
    q, dlq = b.queue("q"), b.queue("q-dlq")
    assert q.url.endswith("/f-q.fifo") and attributes_of(aws, q.url)["FifoQueue"] == "true"
    # Native deduplication: a known id sent again (another call) is dropped.
    q.send("one", id="m1")
    q.send("dup", id="m1")
    q.send_batch([OutgoingMessage(f"g{i}", {"message_group_id": "g"}) for i in range(3)])
    got = q.receive(10)
    assert [m.body for m in got] == ["one", "g0", "g1", "g2"]
    # A failure on FIFO keeps the message in its place: only hidden for the backoff.
    first = got[0]
    assert q.ack(got[1:]) == 3
    assert q.record_failure(first, {"error_type": "E"}, 0)
    [again] = q.receive(1, wait=2)
    assert again.id == "m1" and again.receive_count == 2 and again.failure is None
    q.dead_letter(again, {"error_type": "E", "message": "last"})
    [dead] = dlq.peek()
    assert dead.id == "m1" and dead.failure == {"error_type": "E", "message": "last"}
    # FIFO topic → FIFO queues.
    b.publish("fanout", [OutgoingMessage("t1", id="t1"), OutgoingMessage("t2", id="t2")])
    assert [m.body for m in b.queue("other").receive(10)] == ["t1", "t2"]


# -- manage=false: queues made by Terraform, used as they are ---------------------------

KEPT = ("VisibilityTimeout", "DelaySeconds", "RedrivePolicy", "Policy", "MessageRetentionPeriod")


def test_manage_false_uses_existing_queues_and_never_changes_them(aws: str) -> None:
    prefix = fresh_prefix()
    made = broker(aws, prefix)  # stands in for Terraform: queues, DLQ, topic, subscriptions
    sqs = client("sqs", aws)
    q_url = made.queue("q").url
    redrive = json.loads(attributes_of(aws, q_url)["RedrivePolicy"])
    redrive["maxReceiveCount"] = 7
    own_policy = json.dumps({"Version": "2012-10-17", "Statement": [{"Sid": "terraform's"}]})
    sqs.set_queue_attributes(
        QueueUrl=q_url,
        Attributes={
            "VisibilityTimeout": "180",  # 6 × a 30 s Lambda timeout, as AWS advises
            "DelaySeconds": "2",
            "RedrivePolicy": json.dumps(redrive),
            "Policy": own_policy,
        },
    )
    before = {n: {k: attributes_of(aws, made.queue(n).url).get(k) for k in KEPT} for n in SPECS}

    used = broker(aws, prefix, manage="false")
    q = used.queue("q")
    assert q.url == q_url
    # The queue's settings, not the file's (visibility 1 s, 3 receives, no delay).
    assert (q.spec.visibility_timeout, q.visibility, q.spec.delay) == (180, 180, 2)
    assert q.spec.max_receive_count == 7
    after = {n: {k: attributes_of(aws, used.queue(n).url).get(k) for k in KEPT} for n in SPECS}
    assert after == before and after["q"]["Policy"] == own_policy

    # And it works: the topic fans out, receives hide for the queue's own timeout.
    used.publish("fanout", [OutgoingMessage("e", id="ev-1")])
    [m] = used.queue("other").receive(1, wait=5)
    assert m.id == "ev-1" and used.queue("other").ack([m]) == 1
    [m] = q.receive(1, wait=5)
    counts = q.counts()
    assert (m.id, counts.in_flight, counts.visible) == ("ev-1", 1, 0)
    assert q.ack([m]) == 1


def test_manage_false_names_every_missing_queue_and_topic(aws: str) -> None:
    from sluiceway.errors import SluicewayError

    prefix = fresh_prefix()
    with pytest.raises(SluicewayError) as e:
        broker(aws, prefix, manage="false")
    text = str(e.value)
    for name in ("q", "q-dlq", "other"):
        assert f"SQS queue {prefix}{name} (the pipeline's queue {name!r}) does not exist" in text
    assert "manage=false" in text and "sluiceway deploy terraform" in text
    assert client("sqs", aws).list_queues(QueueNamePrefix=prefix).get("QueueUrls", []) == []


def test_manage_false_refuses_a_topic_without_the_queues_subscription(aws: str) -> None:
    from sluiceway.errors import SluicewayError
    from sluiceway.queues.sqs import SqsBroker

    prefix = fresh_prefix()
    made = broker(aws, prefix)
    sns = client("sns", aws)
    arn = made._topic_arns["fanout"]
    for sub in sns.list_subscriptions_by_topic(TopicArn=arn)["Subscriptions"]:
        if sub["Endpoint"] == made.queue("other").arn:
            sns.unsubscribe(SubscriptionArn=sub["SubscriptionArn"])
    url = sqs_url(aws, prefix, manage="false")
    with pytest.raises(SluicewayError) as e:
        SqsBroker.from_url(url, SPECS, {"fanout": ["q", "other"]})
    assert f"SNS topic {prefix}fanout has no subscription for SQS queue" in str(e.value)
    assert made.queue("other").arn in str(e.value)
    # Nothing was re-subscribed behind the user's back.
    endpoints = {
        s["Endpoint"] for s in sns.list_subscriptions_by_topic(TopicArn=arn)["Subscriptions"]
    }
    assert made.queue("other").arn not in endpoints
