"""The transports `mpkv bench ipc` compares: for each, a factory of the two ends of a link (mpkv ring,
multiprocessing Queue and Pipe, faster-fifo, ZeroMQ ipc://), behind one small Port interface."""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import select
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from mpkv import naming
from mpkv.shm.registry import Registry
from mpkv.shm.ring import RingReader, RingWriter, create_ring
from mpkv.shm.waiting import DEFAULT_TIMEOUT_S

CTX = mp.get_context("spawn")
# Bound on any single wait (a child's start included), so a broken transport fails instead of hanging: the
# ring's own default, which its hot-path calls below rely on, and the explicit timeout of every other wait.
TIMEOUT_S = DEFAULT_TIMEOUT_S
SIZES = (64, 4096)  # round-trip payloads
MSG_BYTES = 64  # one-way and batched payloads
RECORD_BATCH = 4096
MANY_BATCH = 256
RING_BYTES = 1 << 20  # the rings of the round-trip and one-way runs
RECORD_RING_BYTES = 1 << 22
QUEUE_BYTES = 1 << 23  # faster-fifo's circular buffer
STOP = b""  # ends an echo loop or a stream; no measured message is empty
ACK = b"ack"  # the consumer got everything: the producer may close (a ZeroMQ PAIR drops what is unread)


class BenchError(RuntimeError):
    """A transport misbehaved: a wrong count, a corrupted or reordered message, a child that failed."""


@dataclass(frozen=True)
class Params:
    rtt_n: int  # timed round trips per payload size
    rtt_warmup: int
    stream_n: int  # one-way messages per transport
    record_batches: int  # of RECORD_BATCH records
    many_n: int  # put_many messages (a multiple of MANY_BATCH)
    idle_s: float


FULL = Params(rtt_n=10_000, rtt_warmup=1_000, stream_n=500_000, record_batches=8_192, many_n=4_194_304, idle_s=3.0)
QUICK = Params(rtt_n=1_000, rtt_warmup=100, stream_n=20_000, record_batches=256, many_n=262_144, idle_s=1.0)


# -- transports ---------------------------------------------------------------------------------------------
def _noop() -> None:
    pass


@dataclass
class Port:
    """One process's end of a link: send to the peer, receive from it (bounded by TIMEOUT_S), close."""

    send: Callable[[bytes], object]
    recv: Callable[[], bytes]
    close: Callable[[], None] = _noop


class Link:
    """Both directions between the parent and one child.

    The parent builds it; ``child_args()`` (picklable under spawn) cross to the child, which opens its end
    with ``type(link).child_port(args)``. ``started()`` runs once the child holds its copies; ``close()``
    frees what the parent created.
    """

    def child_args(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def parent_port(self) -> Port:
        raise NotImplementedError

    @classmethod
    def child_port(cls, args: tuple[Any, ...]) -> Port:
        raise NotImplementedError

    def started(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_serial = iter(range(1 << 30))


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_serial)}"


@contextlib.contextmanager
def _registry() -> Iterator[Registry]:
    """A fresh instance for one measurement; everything it lists is unlinked on the way out."""
    reg = Registry.create(_unique("bench"))
    try:
        yield reg
    finally:
        reg.destroy()


def _ring_port(tx: str, rx: str) -> Port:
    writer = RingWriter(tx, label="bench")
    try:
        reader = RingReader(rx, label="bench")
    except BaseException:
        writer.close()
        raise

    def close() -> None:
        reader.close()
        writer.close()

    # Bound methods, not partials (a keyword partial costs as much as the put itself); their default timeout
    # is TIMEOUT_S.
    return Port(writer.put, reader.get, close)


class RingLink(Link):
    """Two mpkv SPSC rings, one each way."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        try:
            reg = self._stack.enter_context(_registry())
            for obj in ("down", "up"):
                self._stack.callback(reg.release, create_ring(reg, obj, RING_BYTES))
            self._down, self._up = reg.name_of("down"), reg.name_of("up")
        except BaseException:
            self._stack.close()
            raise

    def child_args(self) -> tuple[Any, ...]:
        return self._down, self._up

    def parent_port(self) -> Port:
        return _ring_port(self._down, self._up)

    @classmethod
    def child_port(cls, args: tuple[Any, ...]) -> Port:
        down, up = args
        return _ring_port(up, down)

    def close(self) -> None:
        self._stack.close()


class QueueLink(Link):
    """Two ``multiprocessing.Queue``s."""

    def __init__(self) -> None:
        self._down: mp.Queue[bytes] = CTX.Queue()
        self._up: mp.Queue[bytes] = CTX.Queue()

    def child_args(self) -> tuple[Any, ...]:
        return self._down, self._up

    def parent_port(self) -> Port:
        return Port(self._down.put, partial(self._up.get, True, TIMEOUT_S))

    @classmethod
    def child_port(cls, args: tuple[Any, ...]) -> Port:
        down, up = args

        def close() -> None:  # the feeder thread still flushes what was put, at exit
            down.close()
            up.close()

        return Port(up.put, partial(down.get, True, TIMEOUT_S), close)

    def close(self) -> None:
        for q in (self._down, self._up):
            q.close()
            q.cancel_join_thread()  # the child may be gone with data unread: never block on it


def _pipe_port(conn: Any) -> Port:
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    timeout_ms = int(TIMEOUT_S * 1000)

    def recv() -> bytes:
        if not poller.poll(timeout_ms):
            raise TimeoutError(f"mp.Pipe: nothing received in {TIMEOUT_S:g} s")
        data: bytes = conn.recv_bytes()
        return data

    return Port(conn.send_bytes, recv, conn.close)


class PipeLink(Link):
    """One duplex ``multiprocessing.Pipe``."""

    def __init__(self) -> None:
        self._mine, self._theirs = CTX.Pipe(duplex=True)

    def child_args(self) -> tuple[Any, ...]:
        return (self._theirs,)

    def parent_port(self) -> Port:
        return _pipe_port(self._mine)

    @classmethod
    def child_port(cls, args: tuple[Any, ...]) -> Port:
        return _pipe_port(args[0])

    def started(self) -> None:
        self._theirs.close()  # so the child's exit reads as EOF here, not as silence

    def close(self) -> None:
        self._mine.close()
        self._theirs.close()


def _fifo_port(tx: Any, rx: Any) -> Port:
    return Port(partial(tx.put, block=True, timeout=TIMEOUT_S), partial(rx.get, block=True, timeout=TIMEOUT_S))


class FifoLink(Link):
    """Two ``faster_fifo.Queue``s (bench extra), with their default pickling, as their users call them."""

    def __init__(self) -> None:
        import faster_fifo

        self._down = faster_fifo.Queue(max_size_bytes=QUEUE_BYTES)
        self._up = faster_fifo.Queue(max_size_bytes=QUEUE_BYTES)

    def child_args(self) -> tuple[Any, ...]:
        return self._down, self._up

    def parent_port(self) -> Port:
        return _fifo_port(self._down, self._up)

    @classmethod
    def child_port(cls, args: tuple[Any, ...]) -> Port:
        down, up = args
        return _fifo_port(up, down)


def _zmq_port(addr: str, bind: bool) -> Port:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.SNDTIMEO, int(TIMEOUT_S * 1000))
    sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
    (sock.bind if bind else sock.connect)(addr)

    def close() -> None:
        # The binder (parent) drops what is unsent; the child lingers so that its last messages arrive.
        sock.close(linger=0 if bind else int(TIMEOUT_S * 1000))
        ctx.term()

    return Port(sock.send, sock.recv, close)


class ZmqLink(Link):
    """A ZeroMQ PAIR socket pair over ``ipc://`` (bench extra)."""

    def __init__(self) -> None:
        self._dir = naming.private_socket_dir()
        self._path = os.path.join(self._dir, "link.ipc")
        self._port = _zmq_port(f"ipc://{self._path}", bind=True)

    def child_args(self) -> tuple[Any, ...]:
        return (f"ipc://{self._path}",)

    def parent_port(self) -> Port:
        return Port(self._port.send, self._port.recv)  # closed with the link, which owns the socket

    @classmethod
    def child_port(cls, args: tuple[Any, ...]) -> Port:
        return _zmq_port(args[0], bind=False)

    def close(self) -> None:
        try:
            self._port.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(self._dir)


@dataclass(frozen=True)
class Transport:
    name: str
    link: type[Link]
    needs: str | None = None  # an optional module (a bench extra): without it the row reads "not installed"

    def missing(self) -> str | None:
        if self.needs is None:
            return None
        try:
            importlib.import_module(self.needs)
        except ImportError as e:
            return f"not installed ({e}; pip install 'mpkv[bench]')"
        return None


RING = "mpkv ring"
BASELINE = "mp.Queue"
TRANSPORTS = (
    Transport(RING, RingLink),
    Transport(BASELINE, QueueLink),
    Transport("mp.Pipe", PipeLink),
    Transport("faster-fifo", FifoLink, "faster_fifo"),
    Transport("zmq ipc://", ZmqLink, "zmq"),
)


# -- child processes (module level: spawn pickles them by name) ---------------------------------------------
