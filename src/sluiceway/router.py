"""Events → rules → topics and queues.

Routing is a pure function of the event and the rules, so it runs wherever
an event is raised (``put``, the watcher, a worker committing an output)
instead of in a process of its own: there is no router to crash between an
event and its messages. On the embedded default the routing and the "seen
this object" record share one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .events import Event
from .patterns import Pattern, compile_pattern
from .queues.base import Broker, OutgoingMessage


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: Pattern
    targets: tuple[str, ...]


class Router:
    def __init__(self, rules: Sequence[Rule], broker: Broker, topics: set[str]) -> None:
        self.rules = list(rules)
        self.broker = broker
        self.topics = topics
        self._may_route: dict[str, bool] = {}  # per bucket: the rules never change

    @classmethod
    def from_config(cls, rules: Sequence[object], broker: Broker, topics: set[str]) -> Router:
        compiled = [
            Rule(r.name, compile_pattern(r.pattern), tuple(r.targets))  # type: ignore[attr-defined]
            for r in rules
        ]
        return cls(compiled, broker, topics)

    def targets_for(self, event: Event) -> list[tuple[str, str]]:
        """``(rule, target)`` for every rule that matches; each target once."""
        doc = event.to_dict()
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        for rule in self.rules:
            if rule.pattern.matches(doc):
                for target in rule.targets:
                    if target not in seen:
                        seen.add(target)
                        out.append((rule.name, target))
        return out

    def may_route(self, bucket: str) -> bool:
        """Whether some rule may match an "Object Created" event of ``bucket``.

        Decided soundly from the patterns alone (``Pattern.may_match_with``):
        False means no object in this bucket can ever reach a queue.
        """
        known = self._may_route.get(bucket)
        if known is None:
            known = any(r.pattern.may_match_with("detail.bucket.name", bucket) for r in self.rules)
            self._may_route[bucket] = known
        return known

    def route(self, event: Event) -> list[str]:
        """Deliver the event to every matching target; returns the targets.

        The message id is the event id, so routing the same event twice (a
        retried ``put``, two rules naming one queue) queues it once.
        """
        return self.send(self.plan(event))

    def plan(self, event: Event) -> list[tuple[str, OutgoingMessage]]:
        """The messages ``route`` sends, per target: all the matching and encoding.

        Separate from ``send`` so callers can do this work before they take
        the state database's write lock, and hold it only for the inserts.
        """
        targets = self.targets_for(event)
        if not targets:
            return []
        body = event.to_json()
        return [
            (target, OutgoingMessage(body=body, attributes={"rule": rule}, id=event.id))
            for rule, target in targets
        ]

    def send(self, plan: Sequence[tuple[str, OutgoingMessage]]) -> list[str]:
        """Send planned messages: one call per target (a batch of events shares them)."""
        by_target: dict[str, list[OutgoingMessage]] = {}
        for target, msg in plan:
            by_target.setdefault(target, []).append(msg)
        for target, msgs in by_target.items():
            if target in self.topics:
                self.broker.publish(target, msgs)
            else:
                self.broker.queue(target).send_batch(msgs)
        return [target for target, _ in plan]
