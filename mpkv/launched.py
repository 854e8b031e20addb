"""``mpkv.launch`` (defined here): a whole instance (`mpkv launch --json` in a child process) for the code that
needs one: the demo, the benchmarks, the tests.

The order, and why:
  start      `python -m mpkv.cli launch ... --json` in a session of its own (a Ctrl-C meant for the caller does
             not reach the instance half-way: the caller tears it down in order) that gets SIGTERM from the kernel
             if the thread that started it dies, even by kill -9 (PR_SET_PDEATHSIG): its ordered teardown then
             unlinks every name (I6). So start and stop it from a thread that outlives the instance.
  ready      the launcher prints one JSON object on stdout once every actor is READY; everything else it says goes
             to stderr. Two threads drain both pipes (a full pipe would stall the launcher); the wait for the ready
             line is bounded and watches the launcher (I2): a launcher that exits or fails first raises LaunchError
             quoting the last lines it wrote, never a hang.
  stop       SIGTERM (the launcher's ordered teardown unlinks every name), a bounded wait; then SIGKILL to the
             whole process group (launcher, forkserver, actors), a bounded wait for the group to be gone, and
             `mpkv cleanup NAME` (the names of the run it killed). Idempotent: a second stop does nothing.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from mpkv.config import CacheConfig
from mpkv.errors import LaunchError, PeerDied, WaitTimeout
from mpkv.shm.cleanup import cleanup
from mpkv.shm.proc import ProcId
from mpkv.shm.waiting import Peer, wait_until

READY_TIMEOUT_S = 180.0  # generous: on 2 busy cores a forkserver importing torch takes tens of seconds
STOP_TIMEOUT_S = 60.0  # the launcher's own escalation (SHUTDOWN, SIGTERM, SIGKILL of actors) fits in this
KILL_TIMEOUT_S = 10.0
TAIL_LINES = 20  # of the launcher's output, quoted in a LaunchError
KEEP_LINES = 5000  # what a handle remembers of the launcher's output (it says little: its own lines, warnings)
PR_SET_PDEATHSIG = 1


def launch_args(
    name: str,
    tp: int | None = None,
    role: str | None = None,
    backend: str | None = None,
    **geometry: int | str | bool,
) -> list[str]:
    """The command line of `mpkv launch --json` for these settings (``geometry``: CacheConfig fields, e.g.
    ``device_blocks=64``, ``pool_owner="transfer"``); None leaves the launcher's default."""
    args = [sys.executable, "-m", "mpkv.cli", "launch", "--name", name, "--json"]
    for flag, value in (("tp", tp), ("role", role), ("backend", backend), *geometry.items()):
        if value is True:  # a switch (stable_addresses)
            args.append(f"--{flag.replace('_', '-')}")
        elif value is not None and value is not False:
            args += [f"--{flag.replace('_', '-')}", str(value)]
    return args


class LaunchedInstance:
    """One `mpkv launch` child process and what it said. After ``wait_ready``: ``pid`` (the launcher's),
    ``pids`` ("worker:r0" -> pid), ``config``, ``log_dir``, ``run`` and the whole ready ``record``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.name, self.args = name, args
        self.env = dict(os.environ) | (env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.record: dict[str, Any] | None = None
        # What it said on stdout and stderr, as it came (the last KEEP_LINES lines).
        self.lines: collections.deque[str] = collections.deque(maxlen=KEEP_LINES)
        self._news = threading.Condition()
        self._readers: list[threading.Thread] = []
        self._stdout_done = False
        self._stopped = False

    # -- start, ready ---------------------------------------------------------------------------------------------

    def start(self) -> LaunchedInstance:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child runs nothing but the prctl call
        parent = os.getpid()

        def die_with_us() -> None:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:  # we died before the prctl: no signal will come, so go now
                os._exit(1)

        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            start_new_session=True,
            preexec_fn=die_with_us,
        )
        self._proc_id = ProcId.of(self.proc.pid)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, is_stdout in ((self.proc.stdout, True), (self.proc.stderr, False)):
            t = threading.Thread(target=self._drain, args=(stream, is_stdout), name=f"mpkv.launch:{self.name}")
            t.daemon = True  # a stuck pipe never keeps the caller's process alive
            t.start()
            self._readers.append(t)
        return self

    def _drain(self, stream: IO[bytes], is_stdout: bool) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            record = _ready_record(line) if is_stdout else None
            with self._news:
                if record is not None and self.record is None:
                    self.record = record
                self.lines.append(line)
                self._news.notify_all()
        with self._news:
            self._stdout_done = self._stdout_done or is_stdout
            self._news.notify_all()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
        """Block until the launcher says it is ready; LaunchError (its last lines quoted) if it exits, fails
        or is not ready within ``timeout_s``. The launcher is left running on a timeout: ``stop`` ends it."""
        self._wait(lambda: self.record is not None or self._stdout_done, "to be ready", timeout_s)
        if self.record is None:
            self._settle(KILL_TIMEOUT_S)
            raise LaunchError(f"instance {self.name}: the launcher {self._exit_words()} before ready; {self._tail()}")
        return self.record

    def wait_line(self, needle: str, timeout_s: float = READY_TIMEOUT_S) -> str:
        """The first line the launcher said (on stdout or stderr) that contains ``needle``, waiting for it."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.lines if needle in line][:1]
            return bool(found) or self._finished()

        self._wait(seen, f"to say {needle!r}", timeout_s)
        if not found:
            self._settle(KILL_TIMEOUT_S)
            found[:] = [line for line in self.lines if needle in line][:1]
        if not found:
            raise LaunchError(
                f"instance {self.name}: the launcher {self._exit_words()} without saying {needle!r}; {self._tail()}"
            )
        return found[0]

    def _finished(self) -> bool:
        return self._stdout_done and all(not t.is_alive() for t in self._readers)

    def _wait(self, done: Callable[[], bool], what: str, timeout_s: float) -> None:
        """Bounded (I2), and the launcher's death ends it early: then ``done`` is judged once more by the caller."""
        if self.proc is None:
            raise LaunchError(f"instance {self.name}: not started (start() first)")

        def step(slice_s: float, _spin_s: float) -> bool:
            with self._news:
                if not done():
                    self._news.wait(slice_s)
                return done()

        launcher = Peer("launcher", self._proc_id)
        try:
            wait_until(step, what=f"for instance {self.name} {what}", timeout_s=timeout_s, peers=lambda: [launcher])
        except PeerDied:
            pass  # the caller reads what it said before it went
        except WaitTimeout:
            raise LaunchError(
                f"instance {self.name}: the launcher (pid {self.pid}, {self._proc_id.state()}) did not get {what} "
                f"within {timeout_s:g} s; {self._tail()}"
            ) from None

    # -- what it said -------------------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise LaunchError(f"instance {self.name}: not started")
        return self.proc.pid

    @property
    def ready(self) -> dict[str, Any]:
        """The ready record (LaunchError before it came)."""
        if self.record is None:
            raise LaunchError(f"instance {self.name} is not ready (wait_ready() first)")
        return self.record

    @property
    def pids(self) -> dict[str, int]:
        return dict(self.ready["actors"])

    @property
    def config(self) -> CacheConfig:
        return CacheConfig.from_json(json.dumps(self.ready["config"]))

    @property
    def log_dir(self) -> str:
        return str(self.ready["log_dir"])

    @property
    def run(self) -> str:
        return str(self.ready["run"])

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def _tail(self) -> str:
        tail = list(self.lines)[-TAIL_LINES:]
        return "its last words: " + " | ".join(tail) if tail else "it said nothing"

    def _exit_words(self) -> str:
        code = self.returncode
        if code is None:
            return "closed its output but still runs"
        return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"

    # -- stop ---------------------------------------------------------------------------------------------------

    def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """The launcher's exit code, once it has exited and its output is read; LaunchError if it still runs
        after ``timeout_s`` (left running: ``stop`` ends it)."""
        if self.proc is None:
            raise LaunchError(f"instance {self.name}: not started")
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise LaunchError(
                f"instance {self.name}: the launcher (pid {self.pid}) still runs after {timeout_s:g} s; {self._tail()}"
            ) from None
        self._settle(KILL_TIMEOUT_S)
        return code

    def _settle(self, timeout_s: float) -> None:
        """Wait (bounded) for the launcher to exit and its pipes to be read to the end: its last words are in."""
        if self.proc is None:
            return
        deadline = time.monotonic() + timeout_s
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return
        for t in self._readers:  # EOF once the actors, which share the pipes, are gone too
            t.join(max(0.0, deadline - time.monotonic()))

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, a bounded wait, then SIGKILL of the process group and `mpkv cleanup NAME`; the exit code of the
        launcher (negative: the signal that ended it). A second call only returns it. A launcher that exits by
        itself has unlinked its names; one killed by a signal (by this call, or by anyone) could not, so its names
        are reclaimed here (cleanup spares a live instance's)."""
        if self.proc is None or self._stopped:
            return self.returncode
        self._stopped = True
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        killed = False
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._kill_group()
            killed = True
        # The forkserver and the actors follow a launcher that is gone by their parent-death signals, not at once;
        # cleanup judges names by their owners' liveness, so it comes only once the group is empty.
        if not self._group_gone(KILL_TIMEOUT_S):
            self._kill_group()
            killed = True
            if not self._group_gone(KILL_TIMEOUT_S):
                raise LaunchError(
                    f"instance {self.name}: processes of its group {proc.pid} still run {KILL_TIMEOUT_S:g} s after "
                    f"SIGKILL; its names are kept: run `mpkv cleanup --name {self.name}` once they are gone"
                )
        self._settle(KILL_TIMEOUT_S)
        if not any(t.is_alive() for t in self._readers):
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
        if killed or proc.returncode < 0:  # killed, by us or by anyone: its names may be left; cleanup spares the live
            cleanup(instance=self.name)
        return proc.returncode

    def _kill_group(self) -> None:
        """SIGKILL to the launcher's whole group: it leads it (start_new_session); its forkserver and actors are in
        it."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(KILL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass  # said by the group check that follows

    def _group_gone(self, timeout_s: float) -> bool:
        """Whether every process of the launcher's group has exited within ``timeout_s``."""
        assert self.proc is not None
        group = self.proc.pid

        def gone(slice_s: float, _spin_s: float) -> bool:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return True
            time.sleep(min(slice_s, 0.01))  # polled: the members are not our children, there is no event to wait on
            return False

        try:
            wait_until(gone, what=f"for the processes of instance {self.name} to exit", timeout_s=timeout_s, peers=list)
        except WaitTimeout:
            return False
        return True


def _ready_record(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("event") == "ready" else None


@contextmanager
def launch(
    name: str,
    tp: int | None = None,
    role: str | None = None,
    backend: str | None = None,
    *,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    **geometry: int | str | bool,
) -> Iterator[LaunchedInstance]:
    """Start instance ``name`` (`mpkv launch` in a child process), yield it once ready, tear it down on exit,
    whatever the body did::

        with mpkv.launch("inf0", tp=2, device_blocks=64) as inst, mpkv.Client(inst.name) as client:
            ...

    ``geometry``: CacheConfig fields (``layers``, ``device_blocks``, ``pool_owner``, ``nixl_port``, ...);
    ``env``: added to this process's environment for the launcher. LaunchError if it does not get ready."""
    inst = LaunchedInstance(name, launch_args(name, tp, role, backend, **geometry), env)
    try:
        inst.start()  # inside: an interrupt after the launcher began still stops it (stop() takes a never-started one)
        inst.wait_ready(ready_timeout_s)
        yield inst
    finally:
        inst.stop()
