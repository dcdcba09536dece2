"""Sending instructions to site nodes over a Flower ``Grid`` and collecting the replies
(decoding and checking them: common.protocol.read_proxy_reply)."""

from __future__ import annotations

import time
from typing import Callable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from server.state import FederationError


def wait_for_nodes(grid: Grid, min_sites: int, timeout: float,
                   log: Callable[[str], None]) -> list[int]:
    t0 = time.perf_counter()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_sites:
            log(f"[server] {len(nodes)} site node(s) connected")
            return nodes
        if time.perf_counter() - t0 > timeout:
            raise FederationError(f"only {len(nodes)} of federation.min_sites={min_sites} site "
                                  f"nodes connected within {timeout:.0f} s")
        time.sleep(1.0)


def exchange(grid: Grid, contents: dict[int, RecordDict], message_type: str, group: str,
             timeout: float, on_reply: Callable[[int, Message], None]) -> list[int]:
    """Send one message per node and hand each reply to ``on_reply`` as it arrives (so replies
    can be folded without holding them all). Returns the nodes that did not reply in time."""
    msgs = [Message(content, dst_node_id=node, message_type=message_type, group_id=group)
            for node, content in contents.items()]
    ids = list(grid.push_messages(msgs))
    pending = {mid: node for mid, node in zip(ids, contents) if mid}
    deadline = time.perf_counter() + timeout
    while pending and time.perf_counter() < deadline:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                on_reply(node, reply)
        if pending:
            time.sleep(0.2)
    return list(pending.values())
