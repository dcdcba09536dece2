"""Compact encoding of proxy replies: quantised maps, bit-packed and entropy-coded.

A site's compact reply (``reply.output: foreground``, ``reply.features: pooled``) consists of
non-negative maps of shape (N, C, h, w): the gland probability (C = 1, values in [0, 1]) and the
channel-pooled feature maps (C = 1 per feature, values >= 0). Each map travels as **one stream**,
a 1-D uint8 array in the reply's ArrayRecord::

    header  b"FKDC" | version u8 | bits u8 | codec u8 | flags u8 | N C h w (4 x u32, little end.)
            | payload length before entropy coding (u32)
    payload codec( [scales (N, C) float32 if not FIXED_RANGE] + codes packed 8/bits per byte )

Quantisation is uniform on [0, s] with ``L = 2**bits - 1`` levels: ``q = round(x / s * L)``,
``x ~= q * s / L``, so the error is at most ``s / (2 L)`` per value. ``s`` is 1 for
probabilities (flag FIXED_RANGE: no scales are sent) and max(x[n, c]) for features. Most proxy
pixels are confident background (code 0), which the entropy coder (zlib or lzma from the
standard library) squeezes to almost nothing.

:func:`decode_stream` validates everything a malformed or hostile stream could get wrong (magic,
version, bits, codec, shape against what was asked for, the declared and the real payload size,
a cap on the decompressed size) and raises :class:`~common.protocol.ProtocolError` naming the
cause; the server then excludes the site with that reason.
"""

from __future__ import annotations

import lzma
import struct
import zlib

import numpy as np

MAGIC = b"FKDC"
VERSION = 1
BITS = (1, 2, 4, 8)
CODECS = {"none": 0, "zlib": 1, "lzma": 2}
FIXED_RANGE = 1                       # flag: values in [0, 1], no per-map scales in the payload
_HEADER = struct.Struct("<4sBBBB4II")  # magic, version, bits, codec, flags, N, C, h, w, raw len
HEADER_BYTES = _HEADER.size


class CodecError(ValueError):
    """A stream that cannot be decoded; the message names the cause."""


def quantize(x: np.ndarray, bits: int, fixed_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """x (B, C, h, w) >= 0 -> (codes (B, C, h, w) uint8 in [0, 2**bits - 1], scales (B, C)
    float32). ``fixed_range``: x in [0, 1], scales are 1 (values outside are clipped)."""
    if bits not in BITS:
        raise CodecError(f"bits: expected one of {BITS}, got {bits}")
    levels = (1 << bits) - 1
    x = np.asarray(x, np.float32)
    if fixed_range:
        scale = np.ones(x.shape[:2], np.float32)
    else:
        amax = x.reshape(x.shape[0], x.shape[1], -1).max(axis=2) if x.size else np.zeros(x.shape[:2])
        scale = np.where(amax > 0, amax, 1.0).astype(np.float32)
    q = np.rint(np.clip(x / scale[:, :, None, None], 0.0, 1.0) * levels)
    return q.astype(np.uint8), scale


def dequantize(codes: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`quantize`: (N, C, h, w) float32."""
    return codes.astype(np.float32) * (scale[:, :, None, None] / ((1 << bits) - 1))


def _pack(codes: np.ndarray, bits: int) -> bytes:
    flat = codes.reshape(-1)
    per = 8 // bits
    pad = (-len(flat)) % per
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
    groups = flat.reshape(-1, per).astype(np.uint8)
    out = np.zeros(len(groups), np.uint8)
    for i in range(per):
        out |= groups[:, i] << (bits * i)
    return out.tobytes()


def _unpack(data: bytes, bits: int, count: int) -> np.ndarray:
    packed = np.frombuffer(data, np.uint8)
    per = 8 // bits
    mask = (1 << bits) - 1
    out = np.empty((len(packed), per), np.uint8)
    for i in range(per):
        out[:, i] = (packed >> (bits * i)) & mask
    return out.reshape(-1)[:count]


def payload_size(shape: tuple[int, ...], bits: int, fixed_range: bool) -> int:
    """Bytes of a payload before entropy coding: scales + packed codes."""
    n, c = shape[0], shape[1]
    count = int(np.prod(shape))
    return (0 if fixed_range else 4 * n * c) + -(-count // (8 // bits))


def encode_stream(codes: np.ndarray, scale: np.ndarray, bits: int, codec: str,
                  fixed_range: bool) -> np.ndarray:
    """codes (N, C, h, w) uint8 and scales (N, C) of :func:`quantize` -> one uint8 stream."""
    if codec not in CODECS:
        raise CodecError(f"codec: expected one of {', '.join(CODECS)}, got {codec!r}")
    if codes.ndim != 4:
        raise CodecError(f"codes of shape {codes.shape}, expected (N, C, h, w)")
    raw = (b"" if fixed_range else np.ascontiguousarray(scale, "<f4").tobytes()) + _pack(codes, bits)
    body = {"none": lambda b: b, "zlib": lambda b: zlib.compress(b, 9),
            "lzma": lambda b: lzma.compress(b, preset=6)}[codec](raw)
    head = _HEADER.pack(MAGIC, VERSION, bits, CODECS[codec], FIXED_RANGE if fixed_range else 0,
                        *codes.shape, len(raw))
    return np.frombuffer(head + body, np.uint8).copy()


def stream_shape(stream: np.ndarray) -> tuple[int, int, int, int]:
    """The (N, C, h, w) a stream declares (header only; for the payload audit)."""
    return read_header(stream)[4]


def read_header(stream: np.ndarray) -> tuple[int, str, bool, int, tuple[int, int, int, int]]:
    """(bits, codec, fixed range, payload length, (N, C, h, w)) from a stream's header;
    CodecError if it is not a valid header."""
    if not isinstance(stream, np.ndarray) or stream.dtype != np.uint8 or stream.ndim != 1:
        raise CodecError(f"expected a 1-D uint8 stream, got {getattr(stream, 'dtype', type(stream))} "
                         f"of shape {getattr(stream, 'shape', '?')}")
    if len(stream) < HEADER_BYTES:
        raise CodecError(f"stream of {len(stream)} bytes is shorter than its header "
                         f"({HEADER_BYTES} bytes)")
    magic, version, bits, codec, flags, n, c, h, w, raw_len = _HEADER.unpack(
        stream[:HEADER_BYTES].tobytes())
    if magic != MAGIC:
        raise CodecError(f"not a reply stream (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise CodecError(f"stream version {version}, this server reads version {VERSION}")
    if bits not in BITS:
        raise CodecError(f"stream declares {bits} bits, expected one of {BITS}")
    names = {v: k for k, v in CODECS.items()}
    if codec not in names:
        raise CodecError(f"stream declares unknown codec {codec}")
    return bits, names[codec], bool(flags & FIXED_RANGE), raw_len, (n, c, h, w)


def decode_stream(stream: np.ndarray, expect: tuple, fixed_range: bool,
                  max_values: int | None = None) -> np.ndarray:
    """A stream of :func:`encode_stream` -> (N, C, h, w) float32, checked against ``expect``
    (``None`` entries match any size), at most ``max_values`` values, and the range kind.
    CodecError names what is wrong."""
    bits, codec, fixed, raw_len, shape = read_header(stream)
    if len(expect) != 4 or any(e is not None and e != s for e, s in zip(expect, shape)):
        raise CodecError(f"stream of shape {shape}, expected "
                         f"{tuple('*' if e is None else e for e in expect)}")
    if max_values is not None and int(np.prod(shape)) > max_values:
        raise CodecError(f"stream of shape {shape} holds more than the {max_values} values "
                         f"allowed")
    if fixed != fixed_range:
        raise CodecError("stream range: expected " + ("probabilities in [0, 1]" if fixed_range
                                                      else "scaled maps"))
    want = payload_size(shape, bits, fixed)
    if raw_len != want:
        raise CodecError(f"stream declares a payload of {raw_len} bytes, its shape needs {want}")
    body = stream[HEADER_BYTES:].tobytes()
    try:
        if codec == "zlib":
            d = zlib.decompressobj()
            raw = d.decompress(body, want + 1)      # never inflate past what the shape needs
            ok = d.eof and not d.unconsumed_tail
        elif codec == "lzma":
            d = lzma.LZMADecompressor()
            raw = d.decompress(body, max_length=want + 1)
            ok = d.eof
        else:
            raw, ok = body, True
    except (zlib.error, lzma.LZMAError) as exc:
        raise CodecError(f"corrupt {codec} payload: {exc}") from None
    if len(raw) > want:
        raise CodecError(f"{codec} payload inflates past the {want} bytes its shape needs")
    if not ok or len(raw) < want:
        raise CodecError(f"{codec} payload is truncated: {len(raw)} of the {want} bytes its "
                         f"shape needs")
    n, c = shape[0], shape[1]
    offset = 0 if fixed else 4 * n * c
    scale = (np.ones((n, c), np.float32) if fixed
             else np.frombuffer(raw[:offset], "<f4").reshape(n, c).astype(np.float32))
    if not np.isfinite(scale).all() or (scale <= 0).any():
        raise CodecError("stream scales hold NaN, infinite or non-positive values")
    codes = _unpack(raw[offset:], bits, int(np.prod(shape))).reshape(shape)
    return dequantize(codes, scale, bits)
