"""Typed message encoding for ring lanes: msgspec structs as MessagePack; numpy arrays as raw bytes.

A lane carries a tagged union of ``msgspec.Struct`` types; decoding validates the schema, so a peer that
sends the wrong shape gets a ProtocolError, not a half-built object. Arrays travel as an extension type
(dtype string, shape, raw bytes): no pickling, one copy in, and ``np.frombuffer`` (no copy) out.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import numpy as np

from mpkv.errors import ProtocolError

_ARRAY_EXT = 1
_ARRAY_HEAD = struct.Struct("<B8sB")  # ndim, dtype string (e.g. b"<i8"), pad


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        dt = arr.dtype.str.encode()
        if arr.dtype.hasobject or len(dt) > 8:
            raise TypeError(f"arrays of dtype {arr.dtype} cannot travel over a ring")
        head = _ARRAY_HEAD.pack(arr.ndim, dt, 0) + struct.pack(f"<{arr.ndim}q", *arr.shape)
        return msgspec.msgpack.Ext(_ARRAY_EXT, head + arr.tobytes())
    if isinstance(obj, np.integer):
        return int(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} on a ring")


def _ext_hook(code: int, data: memoryview) -> Any:
    if code != _ARRAY_EXT:
        raise ProtocolError(f"unknown extension type {code} in a message")
    # Whatever the bytes say (another writer may be buggy), the outcome is an array or a ProtocolError.
    try:
        ndim, dt, _ = _ARRAY_HEAD.unpack_from(data, 0)
        shape = struct.unpack_from(f"<{ndim}q", data, _ARRAY_HEAD.size)
        dtype = np.dtype(dt.rstrip(b"\0").decode())
        body = data[_ARRAY_HEAD.size + 8 * ndim :]
        if dtype.hasobject or min(shape, default=0) < 0:
            raise ValueError(f"dtype {dtype}, shape {shape}")
        return np.frombuffer(body, dtype=dtype).reshape(shape)
    except (ValueError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise ProtocolError(f"malformed array in a message: {e}") from None


class Codec:
    """Encoder/decoder for one lane's message types (a tagged union of msgspec Structs)."""

    def __init__(self, *types: type[msgspec.Struct]) -> None:
        if not types:
            raise ValueError("a codec needs at least one message type")
        self.types = types
        union: Any = types[0] if len(types) == 1 else _union(types)
        self._enc = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
        self._dec = msgspec.msgpack.Decoder(union, ext_hook=_ext_hook)

    def encode(self, msg: msgspec.Struct) -> bytes:
        return self._enc.encode(msg)

    def decode(self, raw: bytes | memoryview) -> Any:
        try:
            return self._dec.decode(raw)
        except msgspec.ValidationError as e:
            names = ", ".join(t.__name__ for t in self.types)
            raise ProtocolError(f"message does not match this lane's types ({names}): {e}") from None
        except msgspec.DecodeError as e:
            raise ProtocolError(f"message is not valid MessagePack: {e}") from None


def peek(raw: bytes | memoryview) -> tuple[int | None, str]:
    """The ``seq`` field and the type tag of a message that did not decode as its lane's types, as far as they can
    be read: so that whoever cannot use a message can still fail it by its number rather than die or drop it."""
    try:
        msg = msgspec.msgpack.decode(raw, ext_hook=lambda code, data: None)
    except (msgspec.DecodeError, ValueError, TypeError):
        return None, ""
    if not isinstance(msg, dict):
        return None, ""
    seq, tag = msg.get("seq"), msg.get("type")
    ok = isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**63
    return (seq if ok else None), (tag if isinstance(tag, str) else "")


def _union(types: tuple[type[msgspec.Struct], ...]) -> Any:
    out: Any = types[0]
    for t in types[1:]:
        out = out | t
    return out
