"""Shared fixtures: spawn-only children, a unique instance name per test, and a leak check.

The leak check fails a test that leaves a child process alive or a /dev/shm entry behind, after removing
them so that one leak does not cascade into every later test.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from mpkv import naming


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read().decode()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] not in "ZX":
            out.add(int(entry))
    return out


def _descendants(pid: int) -> set[int]:
    todo, seen = [pid], set()
    while todo:
        for c in _children(todo.pop()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


SESSION = uuid.uuid4().hex[:6]  # every instance a test creates is named t<SESSION>...
# Instances that the tests of a module share (tests/instances.py's `shared`): a test may leave new names of one
# (a restore makes pools under new names), so each test's check leaves them out; they are checked when it stops.
SHARED: set[str] = set()


def _shm_entries(only: Collection[str] = ()) -> set[str]:
    # The names of this test session's instances but the shared ones, or (``only``) of these instances (mpkv creates
    # nothing else in /dev/shm: no multiprocessing semaphores). Other programs, other test sessions, a benchmark, may
    # come and go meanwhile.
    user = "/" + naming.user_prefix()
    mine = tuple(user + s + "." for s in only) or (user + "t" + SESSION,)
    skip = () if only else tuple(user + s + "." for s in SHARED)
    return {e for e in os.listdir(naming.SHM_DIR) if ("/" + e).startswith(mine) and not ("/" + e).startswith(skip)}


def pytest_configure(config: pytest.Config) -> None:
    # Tests that share a launched instance (tests/instances.py's `shared`) carry an xdist_group mark: under -n, each
    # group goes to one worker (loadgroup is xdist's load for every other test), or every worker that gets one of
    # them launches the instance again, and again whenever other modules' tests came in between. A worker parses
    # the command line afresh (-n: load), so it is told in its workerinput to name its tests by group.
    config.addinivalue_line("markers", "xdist_group(name): under -n, run on one worker (declared by pytest-xdist too)")
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"
    if getattr(config, "workerinput", {}).get("mpkv_loadgroup"):
        config.option.loadgroup = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    if node.config.getvalue("dist") == "loadgroup":
        node.workerinput["mpkv_loadgroup"] = True


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    with leak_check():
        yield


@contextmanager
def leak_check(only: Collection[str] = ()) -> Iterator[None]:
    """Fails if the block leaves a child process or a /dev/shm entry of this session behind (after removing them,
    so that one leak does not cascade); ``only``: the entries of these instances (shared ones), no others."""
    shm_before = _shm_entries(only)
    procs_before = _descendants(os.getpid())
    yield
    for p in mp.active_children():  # reaps exited ones; a live one is a leak
        p.join(timeout=5)
    leaked_procs = _descendants(os.getpid()) - procs_before
    leaked_shm = _shm_entries(only) - shm_before
    for pid in leaked_procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in mp.active_children():
        p.join(timeout=5)
    for name in leaked_shm:
        try:
            os.unlink(os.path.join(naming.SHM_DIR, name))
        except FileNotFoundError:
            pass
    problems = []
    if leaked_procs:
        problems.append(f"left processes behind: {sorted(leaked_procs)}")
    if leaked_shm:
        problems.append(f"left /dev/shm entries behind: {sorted(leaked_shm)}")
    if problems:
        pytest.fail("; ".join(problems))


def new_name() -> str:
    """A fresh instance name, unique to this test run."""
    return f"t{SESSION}{uuid.uuid4().hex[:8]}"


@pytest.fixture
def instance() -> str:
    """A fresh instance name, unique to this test run."""
    return new_name()


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A seeded RNG whose seed is printed (and shown on failure), so a failure can be replayed."""
    seed = int(os.environ.get("MPKV_TEST_SEED", random.randrange(2**32)))
    print(f"[seed] {request.node.nodeid}: MPKV_TEST_SEED={seed}")
    request.node.user_properties.append(("seed", seed))
    return random.Random(seed)


@pytest.fixture(scope="session", autouse=True)
def _resource_tracker() -> None:
    """Spawning starts multiprocessing's resource tracker once per session: start it before any leak check."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
