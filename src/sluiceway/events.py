"""The event envelope, in the shape of an EventBridge event.

Every transport carries the same JSON, so a rule written against the
envelope matches the same way on the embedded default, on real brokers and
on AWS. Bucket events use S3's own EventBridge shape (``source: aws.s3`` is
replaced by ``sluiceway.bucket`` locally, everything under ``detail`` is the
same), so patterns copied from AWS rules work unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

OBJECT_CREATED = "Object Created"
BUCKET_SOURCE = "sluiceway.bucket"


def _now_iso() -> str:
    """``%Y-%m-%dT%H:%M:%S.%fZ``; isoformat writes it in half strftime's time."""
    return datetime.now(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def _new_id() -> str:
    """A random (version 4) UUID's text, as ``str(uuid.uuid4())`` spells it.

    Built from the hex of 16 random bytes: a third of the cost of a UUID
    object, paid once per event on the path that raises one per file.
    """
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


# The RFC 4122 variant sets the top two bits of the 17th hex digit to 10.
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


@dataclass(frozen=True)
class Event:
    """One event. ``detail`` is free-form JSON; the rest is the envelope."""

    source: str
    detail_type: str
    detail: dict[str, Any]
    id: str = field(default_factory=_new_id)
    time: str = field(default_factory=_now_iso)
    account: str = "000000000000"
    region: str = "local"
    resources: tuple[str, ...] = ()
    version: str = "0"

    def to_dict(self) -> dict[str, Any]:
        """The EventBridge JSON shape (note ``detail-type`` with a dash)."""
        return {
            "version": self.version,
            "id": self.id,
            "detail-type": self.detail_type,
            "source": self.source,
            "account": self.account,
            "time": self.time,
            "region": self.region,
            "resources": list(self.resources),
            "detail": self.detail,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        missing = [k for k in ("id", "source", "detail-type") if k not in data]
        if missing:
            raise ValueError(f"not an event envelope: missing {', '.join(missing)}")
        return cls(
            source=str(data["source"]),
            detail_type=str(data["detail-type"]),
            detail=dict(data.get("detail") or {}),
            id=str(data["id"]),
            time=str(data.get("time") or _now_iso()),
            account=str(data.get("account", "000000000000")),
            region=str(data.get("region", "local")),
            resources=tuple(data.get("resources") or ()),
            version=str(data.get("version", "0")),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        return cls.from_dict(json.loads(text))

    # -- bucket events -------------------------------------------------------

    @property
    def bucket(self) -> str | None:
        return (self.detail.get("bucket") or {}).get("name")

    @property
    def key(self) -> str | None:
        return (self.detail.get("object") or {}).get("key")

    @property
    def etag(self) -> str | None:
        return (self.detail.get("object") or {}).get("etag")

    @property
    def timestamp(self) -> float:
        """``time`` as epoch seconds (now, if it cannot be parsed)."""
        try:
            return datetime.fromisoformat(self.time.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return datetime.now(UTC).timestamp()

    @property
    def input_identity(self) -> str:
        """What makes this input unique: the object version, or the event id.

        Outputs and ledger entries are keyed by this, so a re-delivered
        message maps to the same outputs instead of new ones.
        """
        if self.bucket is not None and self.key is not None:
            return f"{self.bucket}/{self.key}@{self.etag or ''}"
        return f"event:{self.id}"


def object_created(
    bucket: str,
    key: str,
    *,
    size: int,
    etag: str,
    sequencer: str,
    reason: str = "PutObject",
    source: str = BUCKET_SOURCE,
) -> Event:
    """An "Object Created" event as S3 sends it to EventBridge."""
    return Event(
        source=source,
        detail_type=OBJECT_CREATED,
        resources=(f"bucket:{bucket}",),
        detail={
            "version": "0",
            "bucket": {"name": bucket},
            "object": {"key": key, "size": size, "etag": etag, "sequencer": sequencer},
            "request-id": os.urandom(8).hex().upper(),
            "requester": "sluiceway",
            "reason": reason,
        },
    )
