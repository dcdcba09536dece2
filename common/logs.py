"""Loggers of the node and the server: one timestamped line per step or epoch on stderr."""

from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    """``fedkd.client`` / ``fedkd.server``: INFO lines ``HH:MM:SS fedkd MESSAGE``."""
    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s fedkd %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log
