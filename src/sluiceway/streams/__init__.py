"""Streams: ordered records with sequence numbers and consumer checkpoints.

``base`` is the interface, ``sqlite`` the embedded default, ``events`` the
shape of an event record (checked on every way in), ``lease`` the one-consumer
rule and ``consumer`` the exactly-once flush that stream functions run on.
"""

from .base import CheckpointConflict, Record, Stream
from .sqlite import SqliteStream

__all__ = ["CheckpointConflict", "Record", "SqliteStream", "Stream"]
