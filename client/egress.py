"""The node's egress check: no reply leaves carrying the site's private images.

Before a reply is sent, every array in it is read as a flat sequence of numbers (a coded
stream of common.codec is decoded first) and cut into consecutive pieces of one slice's size,
H x W. Each piece is compared with every preprocessed private slice of the site (train,
validation and test) by correlation; a piece that correlates above ``THRESHOLD`` with some
private slice stops the reply. Correlation ignores offset and scale, so a slice survives
casting (float16), int8 quantisation with a per-slice scale, 4-bit coding and reshaping (the
values keep their order), and all of these are caught. What it does not catch: a slice cut at
another offset, permuted, or transformed (e.g. its Fourier transform); a determined
coordinator's code is the coordinator's, and the node's policy (client.policy) limits what it
may ask.

Cost: one matrix product of (pieces x H*W) by (H*W x private slices) per reply, about a second
for a 6,000-slice reply against 500 private slices on 2 cores.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from common.codec import CodecError, decode_stream
from common.protocol import stream_header

THRESHOLD = 0.9
BLOCK = 1024   # pieces compared at a time


class EgressError(PermissionError):
    """A reply that would carry private images."""


def _unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``x`` (K, L) centred and scaled to unit norm, and which rows are not constant."""
    x = x.astype(np.float32, copy=True)
    x -= x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1)
    keep = norm > 1e-6 * np.sqrt(x.shape[1])
    x[keep] /= norm[keep, None]
    return x, keep


def private_signatures(slices: Iterable[np.ndarray]) -> np.ndarray:
    """(M, H*W) float32: the site's non-constant private slices (each (H, W)), centred and of
    unit norm."""
    rows = [np.asarray(s, np.float32).reshape(-1) for s in slices]
    if not rows:
        return np.empty((0, 0), np.float32)
    x, keep = _unit_rows(np.stack(rows))
    return x[keep]


def _values(arr) -> np.ndarray:
    """An outgoing Flower array as a flat float32 sequence (a coded stream: what it decodes to)."""
    raw = np.asarray(arr.numpy())
    head = stream_header(arr)
    if head is not None:
        try:
            _, _, fixed, _, shape = head
            return decode_stream(raw, shape, fixed).reshape(-1)
        except CodecError:
            pass
    return raw.astype(np.float32, copy=False).reshape(-1)


def check_reply(records: dict, signatures: np.ndarray, threshold: float = THRESHOLD) -> None:
    """EgressError naming the record and array if any slice-sized piece of any array in
    ``records`` (``{record name: ArrayRecord}``) correlates above ``threshold`` with a private
    slice of ``signatures`` (:func:`private_signatures`)."""
    if signatures.size == 0:
        return
    size = signatures.shape[1]
    for name, rec in records.items():
        for key, arr in rec.items():
            values = _values(arr)
            n = len(values) // size
            for start in range(0, n, BLOCK):
                stop = min(n, start + BLOCK)
                pieces, keep = _unit_rows(values[start * size:stop * size].reshape(-1, size))
                if not keep.any():
                    continue
                best = (pieces[keep] @ signatures.T).max(axis=1)
                hit = int(np.argmax(best))
                if best[hit] > threshold:
                    piece = start + int(np.flatnonzero(keep)[hit])
                    raise EgressError(
                        f"egress check: reply array {name}.{key} carries a private image (its "
                        f"piece {piece} of {size} values correlates {best[hit]:.3f} with a "
                        f"private slice); the reply was not sent")
