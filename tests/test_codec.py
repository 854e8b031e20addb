"""Typed messages over a ring: structs and arrays round-trip across processes' bytes; bad input is named."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from mpkv.codec import Codec
from mpkv.errors import ProtocolError
from mpkv.shm.registry import Registry
from mpkv.shm.ring import RingReader, RingWriter, create_ring


class SwapOut(msgspec.Struct, tag=True):
    seq: int
    blocks: np.ndarray
    weight_version: int


class Stop(msgspec.Struct, tag=True):
    reason: str


def test_structs_and_arrays_round_trip_through_a_ring(instance: str) -> None:
    codec = Codec(SwapOut, Stop)
    reg = Registry.create(instance)
    try:
        seg = create_ring(reg, "lane", 1 << 14)
        with RingWriter(seg.name) as w, RingReader(seg.name) as r:
            blocks = np.array([[3, 9], [4, 10]], dtype=np.int32)
            w.put(codec.encode(SwapOut(7, blocks, weight_version=2)))
            w.put(codec.encode(Stop("done")))
            got = codec.decode(r.get())
            assert isinstance(got, SwapOut) and got.seq == 7 and got.weight_version == 2
            assert got.blocks.dtype == np.int32 and got.blocks.shape == (2, 2)
            np.testing.assert_array_equal(got.blocks, blocks)
            assert codec.decode(r.get()) == Stop("done")
        reg.release(seg)
    finally:
        reg.destroy()


def test_wrong_messages_are_protocol_errors() -> None:
    codec = Codec(SwapOut, Stop)
    with pytest.raises(ProtocolError, match="does not match this lane's types \\(SwapOut, Stop\\)"):
        codec.decode(msgspec.msgpack.encode({"type": "Launch", "x": 1}))
    with pytest.raises(ProtocolError, match="not valid MessagePack"):
        codec.decode(b"\xc1garbage")
    with pytest.raises(TypeError, match="arrays of dtype object cannot travel"):
        codec.encode(SwapOut(1, np.array([object()]), 1))


def test_malformed_arrays_are_protocol_errors() -> None:
    """Whatever another writer put in an array's bytes, decoding gives an array or a ProtocolError, never
    another exception (that would take down the actor reading the ring)."""
    import struct

    from mpkv.protocol import TASK_CODEC

    def ext(ndim: int, dtype: bytes, shape: tuple[int, ...], body: bytes) -> msgspec.msgpack.Ext:
        return msgspec.msgpack.Ext(
            1, struct.pack("<B8sB", ndim, dtype, 0) + struct.pack(f"<{len(shape)}q", *shape) + body
        )

    for bad in (
        ext(1, b"|O", (1,), b"\0" * 8),  # object arrays would unpickle nothing but crash on use
        ext(1, b"<i4", (5,), b"\0" * 8),  # shape larger than the body
        ext(1, b"<i4", (-1,), b"\0" * 8),
        ext(1, b"zz", (1,), b"\0" * 8),
        msgspec.msgpack.Ext(1, b"\x01"),
    ):
        with pytest.raises(ProtocolError, match="malformed array"):
            TASK_CODEC.decode(msgspec.msgpack.encode({"type": "SwapOut", "seq": 1, "blocks": bad}))
