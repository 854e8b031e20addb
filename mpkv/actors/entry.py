"""The entry point of an actor process, and what every actor process does first.

Kept free of torch at import time: the launcher imports this module, and starts in a second instead of three.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import signal
import stat
import sys
import time
import traceback
from typing import TYPE_CHECKING

from loguru import logger

from mpkv import logs, naming
from mpkv.errors import MpkvError
from mpkv.protocol import ActorState, Role, actor_name, actor_slot

if TYPE_CHECKING:
    from mpkv.actors.runtime import Actor

S = ActorState


def _parse_fault() -> tuple[str, int, str, str] | None:
    """Fault injection for tests: MPKV_FAULT=role:rank:point:what, what = hang | crash | raise.
    Points: start, PAUSE, CLEAR, RESTORE, RESUME, SHUTDOWN (before acting on that command), task (before a task),
    ship (a messager, before it ships a batch). what = raise: an unexpected exception at that point."""
    spec = os.environ.get("MPKV_FAULT")
    if not spec:
        return None
    role, rank, point, what = spec.split(":")
    return role, int(rank), point, what


FAULT = _parse_fault()


def fault_point(role: Role, rank: int, point: str) -> None:
    if FAULT is None or FAULT[:3] != (role.name.lower(), rank, point):
        return
    logger.warning("fault injection: {} r{} {} at {}", role.name.lower(), rank, FAULT[3], point)
    if FAULT[3] == "crash":
        os._exit(3)
    if FAULT[3] == "raise":
        raise RuntimeError(f"fault injection at {point}")
    signal.pause()  # hang: a stuck process, until a test kills it


class _Jitter:
    """Timing perturbation for race tests: MPKV_JITTER_US=max sleeps a random 0..max µs at the named points of
    the PD path (worker: before each layer's progress; messager: before each task and before reading a
    destination), from a generator seeded by MPKV_JITTER_SEED and the actor, so a failing trial replays. It
    moves *when* things become visible, never what: a correct protocol gives the same result under any jitter."""

    def __init__(self) -> None:
        self.max_s = float(os.environ.get("MPKV_JITTER_US", "0")) / 1e6
        self.rng: random.Random | None = None

    def __call__(self, role: Role, rank: int) -> None:
        if self.max_s <= 0:
            return
        if self.rng is None:
            self.rng = random.Random(f"{os.environ.get('MPKV_JITTER_SEED', '0')}:{role.name}:{rank}")
        time.sleep(self.rng.uniform(0, self.max_s))


jitter = _Jitter()


def set_process_title(title: str) -> None:
    """Name the process: the whole title (``mpkv::worker:r0 <instance>``) as its command line in ps and
    /proc/PID/cmdline, through setproctitle where it is installed, and its first 15 characters (the kernel's
    limit) as the name top and /proc/PID/comm show, which needs nothing but prctl."""
    try:
        from setproctitle import setproctitle
    except ImportError:  # the comm name alone still tells the actors apart
        pass
    else:
        setproctitle(title)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, title.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except OSError:  # pragma: no cover - not Linux
        pass


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL us when our parent dies, even by kill -9 (PR_SET_PDEATHSIG). See
    mpkv.actors.forkserver_preload for the chain launcher -> forkserver -> actor."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the launcher died before we got here
        os._exit(1)


def private_log_opener(path: str, flags: int) -> int:
    """loguru opens (and, at each rotation, reopens) the log file through this: never through a link (O_NOFOLLOW),
    created 0600, and only a regular file of ours is written. The launcher made the directory private; this
    holds even when a directory is not what it should be."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise MpkvError(f"log file {path} cannot be opened: {why}; refusing to write to it") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise MpkvError(f"log file {path} is not a regular file of uid {os.getuid()}: refusing to write to it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.fchmod(fd, 0o600)  # ours, left readable by an older mpkv: private from now on
    return fd


def actor_main(role: Role, instance: str, rank: int) -> None:
    """Entry point of an actor process (spawned by the launcher)."""
    die_with_parent()
    import torch

    from mpkv.actors import ROLE_CLASSES
    from mpkv.instance import Instance

    role_cls = ROLE_CLASSES[role]
    set_process_title(naming.actor_title(role.name.lower(), rank, instance))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(1)
    who = f"{role.name.lower()}:r{rank}"
    logs.setup(who)  # the launcher checked MPKV_LOG_LEVEL before it started us
    inst = Instance.attach(instance)
    actor: Actor | None = None
    code, state, text = 0, S.STOPPED, ""
    try:
        if inst.cfg.log_dir:  # one file per actor, each line with its role and rank; shown by mpkv-top, ctl status
            path = naming.actor_log(inst.cfg.log_dir, role.name.lower(), rank)
            logs.add_file(path, who, opener=private_log_opener)
        logger.info("started: pid {}, instance {} run {}", os.getpid(), instance, inst.registry.run_id)
        fault_point(role, rank, "start")
        actor = role_cls(inst, rank)
        profile_to = os.environ.get("MPKV_PROFILE")  # a developer's switch: cProfile each actor into files
        if profile_to:
            import cProfile

            out = naming.actor_profile(profile_to, role.name.lower(), rank)
            cProfile.runctx("actor.run()", globals(), {"actor": actor}, out)
        else:
            actor.run()
    except SystemExit as e:  # SIGTERM from the launcher: a requested stop, not a failure
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # every failure is reported as data, then the process exits non-zero
        code, state = 1, S.FAILED
        text = f"{actor_name(role, rank)} (pid {os.getpid()}) failed: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        logger.error(text)
    finally:
        # Teardown on every path, before the final status: attachers have dropped their views when FAILED shows.
        epoch = actor.status.epoch if actor is not None else 0
        try:
            if actor is not None:
                actor.teardown()
        except BaseException as t:
            code, state = 1, S.FAILED
            text += f"\n{actor_name(role, rank)} teardown failed too: {type(t).__name__}: {t}"
        if text:
            inst.write_error(role, rank, text)
        writer = actor.status_writer if actor is not None else inst.status.writer(actor_slot(role, rank))
        writer.write(state, epoch, 0)
        if actor is not None:
            actor.close()
        else:
            inst.close()
    sys.exit(code)
