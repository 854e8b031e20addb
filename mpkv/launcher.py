"""`mpkv launch`: create the namespace, spawn the actors, wait until ready, supervise, tear down.

Shutdown escalates and says so: SHUTDOWN command (actors detach, owners free, each exits 0) -> SIGTERM
(actors run their teardown in ``finally``) -> SIGKILL. Whatever happens, the ``finally`` unlinks every name the
instance's registry lists, including pools the actors created. If the launcher itself is killed with -9, its
actors get SIGKILL from the kernel (PR_SET_PDEATHSIG) and the next launch of the name, or `mpkv cleanup`,
reclaims the names.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import multiprocessing as mp
import os
import signal
import stat
import time
from collections.abc import Callable
from multiprocessing.connection import wait as wait_sentinels
from multiprocessing.process import BaseProcess
from typing import Any

from loguru import logger

from mpkv import logs, naming
from mpkv.actors.entry import actor_main, set_process_title
from mpkv.config import CacheConfig
from mpkv.errors import LaunchError, MpkvError, PeerDied, UnsafeDir, WaitTimeout
from mpkv.instance import CONTROL_COMMAND, Instance, launcher_slot
from mpkv.protocol import ROLES, ActorState, Cmd, Role, actor_name, actor_slot
from mpkv.publication import reclaim
from mpkv.shm.cleanup import cleanup
from mpkv.shm.proc import ProcId
from mpkv.shm.signals import SignalWriter, TornSlot
from mpkv.shm.waiting import MAX_WORDS, Peer, WakeSet, wait_until

S = ActorState
GRACE_S = 5.0
RECLAIM_S = 2.0  # how often the launcher looks for weight segments of dead publishers
SHUTDOWN_GRACE_S = 60.0
INTERRUPTED = 128 + signal.SIGINT  # the exit code of `mpkv launch` stopped by Ctrl-C, as a shell reports it


def open_private_dir(path: str, dir_fd: int | None = None) -> int:
    """Make ``path`` (mode 0700) unless it exists, then open it without following a link and judge the opened
    directory, not the path (fstat: nothing can be swapped in between): ours, and no access for anyone else.
    Returns the open fd. Once judged, it stays ours: in a sticky or private parent no one else can replace it."""
    try:
        os.mkdir(path, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        what = "is a symbolic link or not a directory" if e.errno in (errno.ELOOP, errno.ENOTDIR) else e.strerror
        raise UnsafeDir(f"{path} {what}") from None
    st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode)
    problem = None
    if st.st_uid != os.getuid():
        problem = f"belongs to uid {st.st_uid}, not to us (uid {os.getuid()})"
    elif mode & 0o077:
        problem = f"has mode {mode:04o}: other users could read the logs or plant links in it"
    if problem:
        os.close(fd)
        raise UnsafeDir(f"{path} {problem}")
    return fd


def _start_forkserver_deaf_to_sigint() -> None:
    """Ctrl-C sends SIGINT to the whole foreground process group: the actors too, where it would raise
    KeyboardInterrupt in the middle of their work. The launcher alone answers it, by the ordered shutdown. So the
    forkserver is started with SIGINT ignored: exec keeps an ignored signal ignored, and the forkserver hands its
    own disposition on to every actor it forks. SIGINT is blocked meanwhile, so that one arriving in between
    stays pending for the launcher's handler, which is back in place before the unblock."""
    from multiprocessing import forkserver

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, handler)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def ready_line(r: dict[str, Any]) -> str:
    """The ready record as the one line a person reads."""
    pids = " ".join(f"{who}={pid}" for who, pid in r["actors"].items())
    return (
        f"mpkv: instance {r['instance']} ready ({r['role']}, tp={r['tp']}, backend={r['backend']}, "
        f"pool owner={r['pool_owner']}, run {r['run']}, pid {r['pid']}; {pids})"
    )


def _exit_words(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class Launcher:
    def __init__(
        self,
        name: str,
        cfg: CacheConfig,
        say: Callable[[str], None] = print,
        on_ready: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """``on_ready`` receives the ready record (``ready_record``) instead of ``say`` its prose line."""
        self.name, self.cfg, self.say, self.on_ready = name, cfg, say, on_ready
        self.procs: dict[tuple[Role, int], BaseProcess] = {}
        self._stop_signal: int | None = None

    def run(self, ready_timeout_s: float = 120.0) -> int:
        logs.setup("launcher")  # first: its lines, and those of the actors it starts, in the one format and level
        logger.info("launching {} (pid {}), log level {}", self.name, os.getpid(), logs.level())
        set_process_title(naming.launcher_title(self.name))
        stale = cleanup(instance=self.name)
        if stale.removed:
            logger.warning("reclaimed {} names of a dead earlier run of {}", len(stale.removed), self.name)
        self.cfg = dataclasses.replace(self.cfg, log_dir=self._log_dir())
        # Signals only set a flag from here on: the teardown below always runs to its end (a second Ctrl-C
        # cannot abort the unlinking half-way); the previous handlers come back after it.
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            inst = Instance.create(self.name, self.cfg)
        except BaseException:
            for s, h in old.items():
                signal.signal(s, h)
            raise
        me = inst.status.writer(launcher_slot(self.cfg.tp))
        code = 1
        try:
            me.write(S.BOOTING, 0)
            # forkserver: one clean, single-threaded server imports torch and mpkv once and forks each actor
            # (no parent threads or state leak into children, unlike plain fork; seconds faster than spawn).
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["mpkv.actors.forkserver_preload"])
            _start_forkserver_deaf_to_sigint()
            for rank in range(self.cfg.tp):
                for role in ROLES:
                    p = ctx.Process(
                        target=actor_main,
                        args=(role, self.name, rank),
                        name=naming.actor_title(role.name.lower(), rank, self.name),
                    )
                    p.start()
                    self.procs[(role, rank)] = p
            self._wait_ready(inst, ready_timeout_s)
            me.write(S.READY, 0)
            ready = self.ready_record(inst.registry.run_id)
            if self.on_ready is not None:
                self.on_ready(ready)
            else:
                self.say(ready_line(ready))
            code = self._supervise(inst, me)
        except LaunchError as e:
            self.say(f"mpkv: instance {self.name}: {e}")
            code = 1
        finally:
            me.write(S.STOPPED if code in (0, INTERRUPTED) else S.FAILED, 0)
            self._stop_all()
            inst.destroy()
            for s, h in old.items():
                signal.signal(s, h)
        return code

    def ready_record(self, run_id: str) -> dict[str, Any]:
        """What `mpkv launch` says once every actor is READY: one record, printed as prose (``ready_line``) or, with
        --json, as one JSON object that mpkv.launch reads (every field a program needs to reach the instance)."""
        return {
            "event": "ready",
            "instance": self.name,
            "run": run_id,
            "pid": os.getpid(),
            "role": self.cfg.pd_role.name.lower(),
            "tp": self.cfg.tp,
            "backend": self.cfg.backend,
            "pool_owner": self.cfg.pool_owner.name.lower(),
            "log_dir": self.cfg.log_dir,
            "actors": {f"{role.name.lower()}:r{rank}": p.pid for (role, rank), p in self.procs.items()},
            "config": json.loads(self.cfg.to_json()),
        }

    def _log_dir(self) -> str:
        """<root>/<instance>, every level ours and 0700: logs hold request ids and errors (invariant I8). The default
        root (<tmp>/mpkv-logs.u<uid>) sits in a world-writable directory where another user may have made it
        first: then a fresh private root is used instead, and said. A root the user named (MPKV_LOG_DIR) that is
        not private is refused: the user asked for that place."""
        named = os.environ.get("MPKV_LOG_DIR")
        root = naming.log_root()
        if named:
            os.makedirs(os.path.dirname(os.path.abspath(named)), mode=0o700, exist_ok=True)
        try:
            root_fd = open_private_dir(root)
        except UnsafeDir as e:
            if named:
                raise LaunchError(
                    f"log directory {e}: refusing to log there; fix it, or set MPKV_LOG_DIR to a directory of yours"
                ) from None
            fresh = naming.fresh_log_root()  # 0700, created O_EXCL
            self.say(f"mpkv: instance {self.name}: log directory {e}; logging to a fresh private {fresh} instead")
            root, root_fd = fresh, open_private_dir(fresh)
        try:
            os.close(open_private_dir(self.name, dir_fd=root_fd))
        except UnsafeDir as e:
            raise LaunchError(f"log directory {os.path.join(root, str(e))}: refusing to log there") from None
        finally:
            os.close(root_fd)
        return os.path.join(root, self.name)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop_signal = signum

    def _wait_ready(self, inst: Instance, timeout_s: float) -> None:
        """Until every actor is READY, through the one bounded wait: asleep on the pending actors' status words, so a
        READY or FAILED is seen at once; an actor that exits, or a stop signal, within a liveness slice."""
        pending = dict(self.procs)
        procs = {k: ProcId.of(p.pid or 0) for k, p in pending.items()}

        def step(slice_s: float, spin_s: float) -> bool:
            # Asleep on (at most MAX_WORDS of) the pending actors' words: with more, the others' changes are seen
            # within a slice, as an exit is.
            wake = WakeSet()
            index = {k: wake.add(inst.status.word(actor_slot(*k))) for k in list(pending)[:MAX_WORDS]}
            wake.snapshot()  # before the slots are read: a write in between still ends the sleep below
            for (role, rank), p in list(pending.items()):
                sig = inst.status.read(actor_slot(role, rank))
                if sig.value == S.FAILED:
                    raise LaunchError(
                        f"{actor_name(role, rank)} failed during start: {inst.read_error(actor_slot(role, rank))}"
                    )
                if sig.value == S.READY:
                    del pending[(role, rank)]
                elif p.exitcode is not None:
                    raise LaunchError(
                        f"{actor_name(role, rank)} (pid {p.pid}) died during start: {_exit_words(p.exitcode)}"
                    )
            if self._stop_signal is not None:
                raise LaunchError(f"interrupted by {signal.Signals(self._stop_signal).name} during start")
            among = [index[k] for k in pending if k in index]
            if among and slice_s > 0:  # none left among the words: the next step sleeps on the others'
                wake.sleep(slice_s, among)
            return not pending

        def peers() -> list[Peer]:
            return [Peer(actor_name(*k), procs[k]) for k in pending]

        try:
            wait_until(step, what="for the actors to start", timeout_s=timeout_s, peers=peers)
        except WaitTimeout:
            late = ", ".join(
                f"{actor_name(r, k)} (pid {p.pid}, {inst.status.read(actor_slot(r, k)).value.name})"
                for (r, k), p in pending.items()
            )
            raise LaunchError(f"not ready after {timeout_s:g} s: still waiting for {late}") from None
        except PeerDied as e:
            # Exited (a zombie in /proc) before its exit code reached us: wait for that, bounded, and say it as a
            # step would have.
            for (role, rank), p in pending.items():
                if not procs[(role, rank)].alive():
                    p.join(GRACE_S)
                    raise LaunchError(
                        f"{actor_name(role, rank)} (pid {p.pid}) died during start: {_exit_words(p.exitcode)}"
                    ) from None
            raise LaunchError(f"an actor died during start: {e}") from None

    def _reclaim_weights(self, inst: Instance) -> None:
        """Weight segments a dead publisher left that no publication refers to (NOTE [ weight publications ])."""
        try:
            removed = reclaim(inst.registry, inst.read_weights())
        except (MpkvError, OSError) as e:  # keep everything; the next look tries again
            logger.warning("weight segments not reclaimed this time: {}", e)
            return
        for name in removed:
            logger.info("reclaimed {} (its publisher died; no publication refers to it)", name)

    def _supervise(self, inst: Instance, me: SignalWriter[ActorState]) -> int:
        shutdown_deadline: float | None = None
        last_cmd = inst.control.read(CONTROL_COMMAND)
        next_reclaim = 0.0
        while True:
            alive = [p for p in self.procs.values() if p.exitcode is None]
            if self._stop_signal is not None:
                self.say(
                    f"mpkv: instance {self.name}: {signal.Signals(self._stop_signal).name} received, shutting down"
                )
                # SIGTERM is the ordinary way to stop a service (exit 0); Ctrl-C exits as an interrupted
                # command does in a shell (130), so that a script running `mpkv launch` sees it was interrupted.
                return INTERRUPTED if self._stop_signal == signal.SIGINT else 0
            try:
                cmd = inst.control.read(CONTROL_COMMAND)
            except TornSlot:  # a controller died writing it: that command never happened (the next one repairs it)
                cmd = last_cmd
            last_cmd = cmd
            dead = [(k, p) for k, p in self.procs.items() if p.exitcode is not None]
            if cmd.value == Cmd.SHUTDOWN:
                shutdown_deadline = shutdown_deadline or time.monotonic() + SHUTDOWN_GRACE_S
                if time.monotonic() > shutdown_deadline:
                    late = ", ".join(actor_name(r, k) for (r, k), p in self.procs.items() if p.exitcode is None)
                    self.say(
                        f"mpkv: instance {self.name}: {late} still running {SHUTDOWN_GRACE_S:g} s after "
                        "SHUTDOWN; stopping them"
                    )
                    return 1
            if dead and cmd.value == Cmd.SHUTDOWN and all(p.exitcode == 0 for _, p in dead):
                if not alive:
                    self.say(f"mpkv: instance {self.name} shut down by its controller")
                    return 0
            elif dead:
                (role, rank), p = dead[0]
                err = inst.read_error(actor_slot(role, rank)).strip()
                why = err.splitlines()[0] if err else "no error recorded (killed?)"
                self.say(
                    f"mpkv: instance {self.name}: {actor_name(role, rank)} (pid {p.pid}) died with "
                    f"{_exit_words(p.exitcode)}: {why}; tearing the instance down"
                )
                return 1
            me.write(S.READY, 0)  # heartbeat
            if time.monotonic() >= next_reclaim:
                self._reclaim_weights(inst)
                next_reclaim = time.monotonic() + RECLAIM_S
            wait_sentinels([p.sentinel for p in alive], timeout=0.5)

    def _stop_all(self) -> None:
        """SIGTERM, then SIGKILL whoever is still there after the grace period; say so at each step."""
        alive = [p for p in self.procs.values() if p.exitcode is None]
        if alive:
            logger.info("terminating {} actors", len(alive))
            for p in alive:
                p.terminate()
            deadline = time.monotonic() + GRACE_S
            for p in alive:
                p.join(max(0.0, deadline - time.monotonic()))
        for (role, rank), p in self.procs.items():
            if p.exitcode is None:
                logger.warning(
                    "{} (pid {}) ignored SIGTERM for {} s: killing it", actor_name(role, rank), p.pid, GRACE_S
                )
                p.kill()
                p.join(GRACE_S)
