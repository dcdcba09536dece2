"""Payload audit: a record of every message that crosses the wire (``output.audit: true``).

:class:`AuditGrid` wraps the ServerApp's ``Grid`` (the SuperLink's in a deployment, the
Simulation Engine's in a simulation) and appends one JSON line per message to
``RUN_DIR/audit.jsonl``: direction (``to-site`` / ``from-site``), node id, site (from the reply's
``info`` record when known), message type, total array bytes, and for every array its record,
name, shape, dtype and bytes (for a coded stream of common.codec also the shape it decodes to,
its bits and codec); metric and config records are listed by key. Array contents are never
written. ``inspect`` (tests) additionally sees every raw array.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.codec import decode_stream
from common.protocol import describe_message as describe, stream_header as _stream_header


class AuditGrid(Grid):
    """A Grid that records every message it sends and every reply it receives."""

    def __init__(self, grid: Grid, path: Path,
                 inspect: Optional[Callable[[str, Message], None]] = None):
        self.grid, self.path, self.inspect = grid, Path(path), inspect
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _record(self, direction: str, msgs: list[Message]) -> None:
        with self.path.open("a") as fh:
            for m in msgs:
                fh.write(json.dumps(describe(m, direction)) + "\n")
                if self.inspect is not None:
                    self.inspect(direction, m)

    # delegated Grid API ---------------------------------------------------------------------
    @property
    def run(self):
        return self.grid.run

    def set_run(self, run_id: int) -> None:
        self.grid.set_run(run_id)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: Optional[float] = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._record("to-site", messages)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self._record("from-site", replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        self._record("to-site", messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self._record("from-site", replies)
        return replies


def array_bytes(msg: Message) -> Iterable[bytes]:
    """The raw bytes of every array in ``msg``, and of what each coded stream decodes to (for
    canary searches: a compressed stream would hide a pattern from a search of its bytes)."""
    if msg.has_error():
        return
    for rec in msg.content.values():
        if isinstance(rec, ArrayRecord):
            for arr in rec.values():
                raw = np.ascontiguousarray(arr.numpy())
                yield raw.tobytes()
                head = _stream_header(arr)
                if head is not None:
                    _, _, fixed, _, shape = head
                    yield decode_stream(raw, shape, fixed).tobytes()
