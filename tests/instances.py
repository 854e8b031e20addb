"""Launch a real instance (`mpkv launch` in a child process) for a test, and always tear it down."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from conftest import SHARED, leak_check, new_name

from mpkv.client import Client
from mpkv.controller import Controller
from mpkv.launched import LaunchedInstance, launch_args
from mpkv.verify import verify_kv

verify = verify_kv  # the tests' short name for it

SMALL = dict(layers=2, kv_heads=4, head_dim=16, block_size=8, device_blocks=64, host_blocks=64)


class Launched(LaunchedInstance):
    """mpkv.launch's handle with the tests' defaults (small geometry, tp=2), started at once: ``with`` waits for
    ready and stops it; without ``with``, ``wait_line`` and ``exit_code`` watch a launcher that is meant to fail."""

    def __init__(
        self,
        name: str,
        tp: int = 2,
        owner: str = "worker",
        fault: str | None = None,
        role: str = "mixed",
        env: dict[str, str] | None = None,
        **geometry: int,
    ) -> None:
        env = dict(env or {}) | ({"MPKV_FAULT": fault} if fault else {})
        args = launch_args(name, tp=tp, role=role, pool_owner=owner, **(SMALL | geometry))
        super().__init__(name, args, env)
        self.start()

    def __enter__(self) -> Launched:
        try:
            self.wait_ready()
        except BaseException:  # no __exit__ follows a failed __enter__: stop it here, or it outlives the test
            self.stop()
            raise
        return self

    def exit_code(self, timeout_s: float = 60) -> int:
        """The launcher's exit code; killed (and the test failed) if it does not exit within ``timeout_s``."""
        try:
            return self.wait_exit(timeout_s)
        finally:
            if self.returncode is None:
                self.stop(timeout_s=1)

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def shared(*names: str) -> Iterator[None]:
    """For a module-scoped fixture whose instances (``names``, launched in the block) its tests share: each test's
    leak check leaves their names out (a test may restore, making pools under new names); the block's end checks
    that stopping them left no process and no name behind. A test that uses one leaves it serving, as it found it."""
    with leak_check(only=names):
        SHARED.update(names)
        try:
            yield
        finally:
            SHARED.difference_update(names)


@contextmanager
def shared_instance(tp: int = 2, **settings: Any) -> Iterator[Launched]:
    """One instance (``Launched``'s settings) that the tests of a module share, each leaving it serving as it found
    it; in the end a SHUTDOWN, which must still go through, and a leak check (``shared``)."""
    name = new_name()
    with shared(name), Launched(name, tp=tp, **settings) as inst:
        yield inst
        with Controller(name) as ctl:
            ctl.shutdown()
        assert inst.exit_code() == 0, list(inst.lines)[-20:]


def back_to_serving(request: pytest.FixtureRequest, *fixtures: str) -> None:
    """After a test, the shared instances it used (``fixtures``: their names, or (name, ...) tuples) serve again: a
    test that failed half-way may have left one paused or cleared, and the next test would fail for it (one failure,
    not a cascade). What every step admits after a step all actors acknowledged: pause, full clear, restore, resume."""
    for fixture in fixtures:
        if fixture not in request.fixturenames:
            continue
        value = request.getfixturevalue(fixture)
        with Controller(value if isinstance(value, str) else value[0]) as ctl:
            st = ctl.status()
            if st.step.done and st.command.kind in ("NONE", "RESUME"):
                continue
            ctl.pause()
            ctl.clear()
            ctl.restore()
            ctl.resume()


def prefill_and_verify(client: Client, rng: np.random.Generator, blocks: np.ndarray, wv: int) -> np.ndarray:
    n_tokens = int(rng.integers(1, len(blocks) * client.cfg.block_size + 1))
    n_tokens = max(n_tokens, (len(blocks) - 1) * client.cfg.block_size + 1)
    tokens = rng.integers(0, client.cfg.vocab, n_tokens, dtype=np.int32)
    client.wait(client.prefill("req", tokens, blocks))
    verify_kv(client, tokens, blocks, wv)
    return tokens
