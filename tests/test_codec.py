"""Compact reply streams (common.codec): round trip within the stated error, refusal of
malformed or hostile streams with a clear reason."""

import zlib

import numpy as np
import pytest

from common.codec import (
    HEADER_BYTES,
    CodecError,
    decode_stream,
    encode_stream,
    quantize,
    stream_shape,
)


def gland_probabilities(n=12, size=32, seed=0) -> np.ndarray:
    """(n, 1, size, size) probabilities: a soft disc on confident background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(3, 8)
        d = np.hypot(yy - cy, xx - cx) - r
        out[i, 0] = 1 / (1 + np.exp(d * 1.5))
    return out


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("codec", ["zlib", "lzma", "none"])
def test_round_trip_within_the_quantisation_error(bits, codec):
    p = gland_probabilities()
    stream = encode_stream(*quantize(p, bits, True), bits, codec, True)
    back = decode_stream(stream, (12, 1, 32, 32), True)
    assert back.shape == p.shape and back.dtype == np.float32
    assert np.abs(back - p).max() <= 0.5 / (2 ** bits - 1) + 1e-6
    assert stream_shape(stream) == (12, 1, 32, 32)
    # scaled maps (channel RMS features): the error is relative to each map's maximum
    f = np.random.default_rng(1).gamma(2.0, 3.0, (5, 2, 8, 8)).astype(np.float32)
    back = decode_stream(encode_stream(*quantize(f, bits, False), bits, codec, False),
                         (5, 2, None, None), False)
    amax = f.reshape(5, 2, -1).max(axis=2)[:, :, None, None]
    assert (np.abs(back - f) <= amax * 0.5 / (2 ** bits - 1) + 1e-5).all()


def test_a_mostly_background_map_codes_far_below_its_raw_size():
    p = gland_probabilities(n=40, size=64)
    raw16 = p.astype(np.float16).nbytes * 2          # today's two float16 logit channels
    sizes = {b: len(encode_stream(*quantize(p, b, True), b, "zlib", True)) for b in (8, 4)}
    assert sizes[4] < sizes[8] < raw16 / 10
    assert sizes[4] < raw16 / 30, sizes


def test_malformed_streams_are_refused_with_the_cause():
    p = gland_probabilities(n=4)
    good = encode_stream(*quantize(p, 4, True), 4, "zlib", True)
    ok = (4, 1, 32, 32)
    cases = {
        "magic": (np.concatenate([np.frombuffer(b"XXXX", np.uint8), good[4:]]), ok),
        "shorter than its header": (good[:10], ok),
        "stream of shape": (good, (5, 1, 32, 32)),
        "corrupt zlib payload": (np.concatenate([good[:HEADER_BYTES],
                                                 np.full(40, 7, np.uint8)]), ok),
        "zlib payload is truncated": (good[:-6], ok),
        "1-D uint8 stream": (good.astype(np.int16), ok),
    }
    for cause, (stream, expect) in cases.items():
        with pytest.raises(CodecError, match=cause):
            decode_stream(stream, expect, True)
    with pytest.raises(CodecError, match="expected probabilities"):
        decode_stream(encode_stream(*quantize(p, 4, False), 4, "zlib", False), ok, True)
    # a header that lies about the payload size, and a bomb that inflates past its shape
    head = bytearray(good[:HEADER_BYTES].tobytes())
    head[-4:] = (10 ** 9).to_bytes(4, "little")
    with pytest.raises(CodecError, match="its shape needs"):
        decode_stream(np.frombuffer(bytes(head) + good[HEADER_BYTES:].tobytes(), np.uint8), ok, True)
    bomb = np.frombuffer(good[:HEADER_BYTES].tobytes() + zlib.compress(bytes(10 ** 7)), np.uint8)
    with pytest.raises(CodecError, match="inflates past the 2048 bytes its shape needs"):
        decode_stream(bomb, ok, True)
    with pytest.raises(CodecError, match="more than the 100 values"):
        decode_stream(good, (4, 1, None, None), True, max_values=100)
