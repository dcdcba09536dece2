"""A Flower ``Grid`` that delivers messages to ClientApps in this process.

It stands in for the SuperLink when the whole federation is one Python process: the server
workflow and the ClientApp run unchanged, only the transport is a function call. Each node has
its own ``Context`` (node config, persistent state). ``tamper`` lets a test alter a reply
(e.g. corrupt a site's arrays) and ``drop`` makes a node stop answering, for fault tests.
"""

from __future__ import annotations

import time
import uuid
from typing import Callable, Iterable, Optional

from flwr.app import Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    def __init__(self, app: ClientApp, node_configs: dict[int, dict], run_config: Optional[dict] = None,
                 tamper: Optional[Callable[[int, Message], Message]] = None):
        self.app = app
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config=nc, state=RecordDict(),
                                      run_config=dict(run_config or {}))
                         for nid, nc in node_configs.items()}
        self.tamper = tamper
        self.dropped: set[int] = set()
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self._run = None
        for attr, value in (("run_id", 1), ("node_id", 0), ("task_id", 0)):
            try:  # messages built by Flower's strategies take the ids of the current task
                getattr(TaskIdentity, attr)
            except RuntimeError:
                setattr(TaskIdentity, attr, value)

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: Optional[float] = None) -> Message:
        md = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=dst_node_id,
                      reply_to_message_id="", group_id=group_id, created_at=time.time(),
                      ttl=ttl or 3600.0, message_type=message_type)
        return Message(content, metadata=md)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.dropped]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if not msg.metadata.message_id:  # a Message built with Message(...), not by a Grid
                msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = msg.metadata.dst_node_id
            self.sent.append(msg)
            if node not in self.dropped:
                reply = self.app(msg, self.contexts[node])
                if self.tamper is not None:
                    reply = self.tamper(node, reply)
                self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(m) for m in message_ids if m in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None
                         ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
