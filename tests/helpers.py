"""Start children and collect their reports, with deadlines: a broken child fails the test, never hangs it."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any

CTX = mp.get_context("spawn")


class Child:
    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.conn, child_conn = CTX.Pipe(duplex=True)
        self.proc = CTX.Process(target=target, args=(*args, child_conn), daemon=True)
        self.proc.start()
        child_conn.close()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def recv(self, timeout_s: float) -> Any:
        if not self.conn.poll(timeout_s):
            raise AssertionError(
                f"child pid {self.pid} sent nothing within {timeout_s} s (alive: {self.proc.is_alive()})"
            )
        return self.conn.recv()

    def result(self, timeout_s: float = 120) -> Any:
        """The child's ("ok", value) payload; fails the test with the child's error otherwise."""
        msg = self.recv(timeout_s)
        self.join(timeout_s)
        if msg[0] != "ok":
            raise AssertionError(f"child pid {self.pid} failed: {msg[1]}: {msg[2]}")
        return msg[1]

    def error(self, timeout_s: float = 120) -> tuple[str, str]:
        """The child's (error type, message); fails the test if it succeeded."""
        msg = self.recv(timeout_s)
        self.join(timeout_s)
        assert msg[0] == "error", f"child pid {self.pid} was expected to fail but returned {msg[1]!r}"
        return msg[1], msg[2]

    def kill(self) -> None:
        self.proc.kill()
        self.join(10)

    def join(self, timeout_s: float) -> None:
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
            raise AssertionError(f"child pid {self.pid} did not exit within {timeout_s} s")
        self.conn.close()
