"""The stable-address pool's descriptor hand-over (mpkv.pool.vmm.FdServer / receive_fd), on any descriptor: the
CUDA part needs a GPU (tests/test_cuda.py), the plumbing does not. Real processes (spawn), a real memfd."""

from __future__ import annotations

import os
import secrets
import socket
from multiprocessing.connection import Connection

import pytest
from helpers import Child
from procs import report

from mpkv.errors import MpkvError
from mpkv.pool.vmm import FdServer, receive_fd


def _read_through_received_fd(name: str, conn: Connection) -> None:
    def body() -> bytes:
        fd = receive_fd(name, "the test's owner", timeout_s=30)
        try:
            return os.pread(fd, 64, 0)
        finally:
            os.close(fd)

    report(conn, body)


def _ask_as_another_user(name: str, conn: Connection) -> None:
    def body() -> tuple[int, str]:
        os.setuid(65534)  # nobody
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # as a client that checks nothing
            sock.settimeout(30)
            sock.connect(name)
            _msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 1)
        try:
            receive_fd(name, "the test's owner", timeout_s=30)
        except MpkvError as e:
            return len(fds), str(e)
        return len(fds), "receive_fd accepted another user's socket"

    report(conn, body)


def _socket_name() -> str:
    return f"\0mpkv-test.vmm.{secrets.token_hex(6)}"


def test_every_attacher_gets_the_owners_descriptor_until_it_stops_serving() -> None:
    fd = os.memfd_create("mpkv-test-vmm", os.MFD_CLOEXEC)
    server = FdServer(_socket_name(), fd)
    try:
        os.write(fd, b"pool memory of epoch 3")
        children = [Child(_read_through_received_fd, server.name) for _ in range(2)]  # an attacher and a link
        assert [c.result(60) for c in children] == [b"pool memory of epoch 3"] * 2
    finally:
        server.close()
        os.close(fd)
    # the epoch is over: who asks now gets a named error at once, not a hang and not the old memory
    late = Child(_read_through_received_fd, server.name)
    kind, message = late.error(60)
    assert kind == "MpkvError" and message.startswith("no pool memory from the test's owner within 30 s")


def test_a_socket_nobody_serves_is_a_named_error() -> None:
    with pytest.raises(MpkvError, match="no pool memory from the pool owner of rank 1"):
        receive_fd(_socket_name(), "the pool owner of rank 1", timeout_s=5)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another user")
def test_another_user_gets_no_descriptor() -> None:
    fd = os.memfd_create("mpkv-test-vmm", os.MFD_CLOEXEC)
    server = FdServer(_socket_name(), fd)
    try:
        given, message = Child(_ask_as_another_user, server.name).result(60)
    finally:
        server.close()
        os.close(fd)
    assert given == 0  # the owner hands nothing to another uid ...
    assert "belongs to uid 0, not to us: refusing its memory" in message  # ... and mpkv's client checks the owner too
