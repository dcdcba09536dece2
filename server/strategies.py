"""Flower's built-in FedAvg / FedProx, with a reproducible aggregate.

Flower sums the sites' weights in float32 in the order their replies arrive. In the Simulation
Engine (and in a real deployment) that order changes from run to run, the last bits of the sum
change with it, and over 15 rounds of training the difference grows: the same FedAvg run gave
0.608 and 0.621 sites' Dice on one synthetic fold (README, "Validation selection"). Here the
replies are put in an order fixed by their content (a hash of their arrays) before Flower's own
aggregation, so equal replies give an equal global model whatever their arrival order.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from flwr.app import Message
from flwr.serverapp.strategy import FedAvg, FedProx


def content_order(replies: Iterable[Message]) -> list[Message]:
    """``replies`` sorted by a hash of their arrays (name, dtype, shape, bytes); replies
    without content (errors) last, in arrival order."""

    def key(msg: Message) -> tuple[int, str]:
        if not msg.has_content():
            return 1, ""
        h = hashlib.sha256()
        for name, record in sorted(msg.content.array_records.items()):
            for k, a in sorted(record.items()):
                h.update(f"{name}/{k}/{a.dtype}/{a.shape}".encode())
                h.update(a.data)
        return 0, h.hexdigest()

    return sorted(replies, key=key)


class _ContentOrdered:
    """Mixin for a Flower strategy: its aggregate does not depend on the replies' arrival
    order."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        return super().aggregate_train(server_round, content_order(replies))


class OrderedFedAvg(_ContentOrdered, FedAvg):
    """FedAvg whose aggregate does not depend on the replies' arrival order."""


class OrderedFedProx(_ContentOrdered, FedProx):
    """FedProx whose aggregate does not depend on the replies' arrival order."""
