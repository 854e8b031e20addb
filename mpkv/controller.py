"""`mpkv.Controller`: the RL trainer's handle on an instance. It only writes the command block.

Each step writes (Cmd, epoch + 1, aux) into the command word, then waits for every actor of every rank to
acknowledge at that epoch (``ACK_OF``), failing fast, by name, on an actor that FAILED (its error record is
quoted) or died. Admission rules (already paused, clear before restore, ...) are ``handshake.check_command``.
The byte-level protocol, for trainers in other languages: docs/control-block.md.
"""

from __future__ import annotations

import operator
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpkv import naming, status
from mpkv.config import MAX_MODEL_CHARS, is_checkpoint
from mpkv.errors import CommandRefused, MpkvError, PeerDied, StepFailed, WaitTimeout  # noqa: F401 (re-exported)
from mpkv.handshake import Command, check_command, step_done
from mpkv.instance import (
    CONTROL_COMMAND,
    CONTROL_FENCE,
    CONTROL_LEDGER,
    FENCE_CLOSING,
    Instance,
    WeightSource,
    controller_wait_slot,
)
from mpkv.layout import SegmentKind
from mpkv.protocol import (
    ACK_OF,
    MAX_WEIGHT_VERSION,
    ROLES,
    ActorState,
    ClearFlags,
    Cmd,
    Role,
    WaitKind,
    actor_name,
    actor_slot,
    pack_slots,
)
from mpkv.report import InstanceStatus
from mpkv.shm.ring import quiesce
from mpkv.shm.segment import Segment
from mpkv.shm.signals import Signal, SignalWriter
from mpkv.shm.waiting import check_timeout
from mpkv.topology import pack_ledger

S = ActorState


@dataclass
class StepResult:
    command: str
    epoch: int
    already: bool = False
    message: str = ""
    latency_s: float = 0.0
    released_bytes: dict[str, int] = field(default_factory=dict)  # per actor, as each measured it
    shm_released_bytes: int = 0  # /dev/shm usage before minus after (cpu backend), as the controller measured it


def _release_claims(writers: tuple[SignalWriter[Any], ...]) -> None:
    for w in writers:
        w.release()


def shm_used_bytes() -> int:
    st = os.statvfs(naming.SHM_DIR)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def publish_refusal(inst: Instance, weight_version: int, path: str) -> str:
    """Why publishing ``path`` as ``weight_version`` is refused, or "". A weight version names one set of weights
    (the tiers' KV is versioned by it, I7), loaded by every rank at one publication:
    - new weights need a new version: not the version served now, nor one published from another directory;
    - the version last published from ``path`` may be restored again only while that restore is the pending step
      (a retry after a timeout: the ranks that adopted it already keep what they loaded, the others load the
      same directory, which must not change meanwhile) or once every actor adopted it (a repeat: "already", or
      fresh pools for the weights every rank holds). Otherwise some ranks may have loaded an earlier content of
      the directory than the others would now: a new version makes every rank load it again."""
    last, statuses, _, served = status.settled(inst)
    published = inst.read_weights()
    if published.weight_version == weight_version:
        if published.path != path:
            return (
                f"weight version {weight_version} was published from {published.path}; weights from {path} need a "
                "weight version of their own"
            )
        pending = last.kind == Cmd.RESTORE and last.aux == weight_version and not step_done(last, statuses)
        if pending or served == weight_version:
            return ""
        return (
            f"weight version {weight_version} was published from {path} by a restore that did not complete; some "
            "ranks may hold an earlier content of that directory: publish it under a new weight version"
        )
    if served == weight_version:
        return (
            f"weights_from publishes new weights, so it needs a new weight version; the instance serves weight "
            f"version {weight_version} already"
        )
    return ""


class Controller:
    def __init__(self, name: str, timeout_s: float = 60.0) -> None:
        self.inst = Instance.attach(name)
        self.name, self.timeout_s, self.cfg = name, timeout_s, self.inst.cfg
        self._writers: tuple[SignalWriter[Cmd], SignalWriter[Cmd], SignalWriter[WaitKind]] | None = None
        self._release: Callable[[], object] = lambda: None
        self._fences: dict[Role, SignalWriter[Cmd]] = {}

    def _claim(self) -> tuple[SignalWriter[Cmd], SignalWriter[Cmd], SignalWriter[WaitKind]]:
        """Become the one writer of the command block, at the first command (``status`` needs no claim)."""
        if self._writers is None:
            claimed: list[SignalWriter[Any]] = []
            try:
                # A command word torn by a controller killed mid-write is repaired as a PAUSE at a new epoch: it
                # drains, never frees and never serves (its zero member, NONE, would read as "run").
                claimed.append(self.inst.control.writer(CONTROL_COMMAND, lambda epoch, aux: (Cmd.PAUSE, epoch + 1, 0)))
                claimed.append(self.inst.control.writer(CONTROL_LEDGER))
                claimed.append(self.inst.waits.writer(controller_wait_slot(self.cfg.tp)))
                fences = {}
                for role, slot in CONTROL_FENCE.items():
                    fences[role] = self.inst.control.writer(slot)
                    claimed.append(fences[role])
            except BaseException:
                _release_claims(tuple(claimed))  # all of the block or nothing
                raise
            self._writers = (claimed[0], claimed[1], claimed[2])
            self._fences = fences
            cmd = self.inst.control.read(CONTROL_COMMAND)
            for fence in fences.values():  # one a dead controller left while closing: it issued nothing
                if fence.array.read_or_dead(fence.slot).epoch > cmd.epoch:
                    fence.write(Cmd.NONE, cmd.epoch, 0)
            # Also when the Controller is dropped without close(): the claims must not outlive their holder.
            self._release = weakref.finalize(self, _release_claims, (*self._writers, *self._fences.values()))
        return self._writers

    def _close_rings(self, kind: Cmd, epoch: int, last: Command, deadline: float) -> None:
        """Before a PAUSE or SHUTDOWN: find, per task ring, the position every reader drains up to, and publish it
        (NOTE [ submission gate ] in mpkv.shm.ring). Clients refuse new tasks from the first write on."""
        positions: dict[Role, int] = {}
        try:
            for w in self._fences.values():
                w.write(kind, epoch, FENCE_CLOSING)
            for role in self._fences:
                seg = Segment.attach(self.inst.task_ring(role), SegmentKind.RING)
                try:
                    what = f"the client to finish a put into tasks.{role.name.lower()} before {kind.name}@{epoch}"
                    positions[role] = quiesce(seg, what=what, timeout_s=max(1e-3, deadline - time.monotonic()))
                finally:
                    seg.close()
        except BaseException as e:  # not issued (timed out, interrupted): clients may submit again
            for fence in self._fences.values():
                fence.write(Cmd.NONE, last.epoch, 0)
            if isinstance(e, WaitTimeout):
                raise StepFailed(f"{kind.name}@{epoch} was not issued: {e}") from None
            raise
        for role, w in self._fences.items():
            w.write(kind, epoch, positions[role])

    # -- the RL transaction ---------------------------------------------------------------------------------
    def pause(self, timeout_s: float | None = None) -> StepResult:
        return self._step(Cmd.PAUSE, 0, timeout_s)

    def clear(self, device: bool = True, host: bool = True, timeout_s: float | None = None) -> StepResult:
        flags = (ClearFlags.DEVICE if device else 0) | (ClearFlags.HOST if host else 0)
        if not flags:
            raise CommandRefused("clear needs device=True, host=True or both")
        before = shm_used_bytes()
        res = self._step(Cmd.CLEAR, int(flags), timeout_s)
        if not res.already:
            res.shm_released_bytes = before - shm_used_bytes()
            if self.cfg.backend == "cpu" and res.shm_released_bytes < sum(res.released_bytes.values()):
                # Less left /dev/shm than the actors freed: either another program allocated meanwhile, or some
                # process still maps a freed pool. The slow check tells which (and names the process).
                self._check_unmapped()
        return res

    def restore(
        self, weight_version: int | None = None, timeout_s: float | None = None, *, weights_from: str | None = None
    ) -> StepResult:
        """Re-allocate the cleared tiers and adopt ``weight_version``. ``weights_from``: a checkpoint directory of
        the same model (a checkpoint instance only) whose weights this version means; it is checked (config and
        every tensor's shape) before anything changes. Without it the workers keep the weights they hold."""
        try:
            wv = self.weight_version if weight_version is None else operator.index(weight_version)
        except TypeError:
            wv = -1
        if isinstance(weight_version, bool) or not 0 <= wv <= MAX_WEIGHT_VERSION:
            raise CommandRefused(
                f"a weight version is an integer from 0 to {MAX_WEIGHT_VERSION}, got {weight_version!r}"
            )
        source = self._weight_source(weights_from, wv)
        return self._step(Cmd.RESTORE, wv, timeout_s, WeightSource(wv, source) if source else None)

    def _weight_source(self, weights_from: str | None, weight_version: int) -> str:
        """``weights_from`` as an absolute path, checked against the model the instance serves, or "". New weights
        take a new weight version (a version names one set of weights: the tiers' KV is versioned by it, I7), and
        a version keeps the weights it was published with (a retried restore cannot give ranks two checkpoints)."""
        if weights_from is None:
            return ""
        if not isinstance(weights_from, (str, os.PathLike)):
            raise CommandRefused(f"weights_from must be a checkpoint directory, got {weights_from!r:.80}")
        if not is_checkpoint(self.cfg.model):
            raise CommandRefused(
                f"instance {self.name} runs the model {self.cfg.model!r}, which loads no checkpoint; weights_from "
                "needs an instance launched with --model DIR"
            )
        from mpkv.models.hf_config import read_config
        from mpkv.models.runner import check_same_model
        from mpkv.models.weights import check_checkpoint

        path = Path(weights_from).expanduser().resolve()
        held = read_config(self.cfg.model)
        check_same_model(held, read_config(path), f"{path}/config.json")
        check_checkpoint(path, held, self.cfg.tp)
        if len(str(path).encode()) > MAX_MODEL_CHARS:
            raise CommandRefused(f"weights_from: the path {str(path)!r:.80}... is longer than {MAX_MODEL_CHARS} bytes")
        why = publish_refusal(self.inst, weight_version, str(path))
        if why:
            raise CommandRefused(f"restore of {self.name}: {why}")
        return str(path)

    def resume(self, timeout_s: float | None = None) -> StepResult:
        return self._step(Cmd.RESUME, 0, timeout_s)

    def shutdown(self, timeout_s: float | None = None) -> StepResult:
        return self._step(Cmd.SHUTDOWN, 0, timeout_s)

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        """The weight version of the KV in the pools (a RESTORE counts once every actor acknowledged it)."""
        return status.settled(self.inst)[3]

    def status(self) -> InstanceStatus:
        """The instance's status record (mpkv.report; `mpkv ctl NAME status --json` is its JSON)."""
        return status.read_status(self.inst)

    def close(self) -> None:
        """Give up the command block (another controller, e.g. `mpkv ctl` in a shell, may then drive the instance)
        and unmap the instance. A controller that is never closed holds the block until its process exits."""
        self._release()
        self.inst.close()

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one step ---------------------------------------------------------------------------------------------
    def _step(self, kind: Cmd, aux: int, timeout_s: float | None, weights: WeightSource | None = None) -> StepResult:
        wait_s = check_timeout(self.timeout_s if timeout_s is None else timeout_s)
        cmd_w, ledger_w, _ = self._claim()  # before reading the block: a claim repairs a slot torn by a dead writer
        last, statuses, cleared, weight_version = status.settled(self.inst)
        refusal = check_command(kind, aux, last, cleared, weight_version, step_done(last, statuses))
        if refusal is not None:
            if refusal.already:
                return StepResult(kind.name, last.epoch, already=True, message=refusal.message)
            raise CommandRefused(f"{kind.name.lower()} refused for instance {self.name}: {refusal.message}")
        if (cleared, weight_version) != status.ledger(self.inst):
            # What the last command settled (a CLEAR issued, a RESTORE acknowledged after its controller gave up
            # waiting, or either by a controller that died before it wrote the ledger): record it now.
            ledger_w.write(last.kind, last.epoch, pack_ledger(weight_version, cleared))
        epoch = last.epoch + 1
        t0 = time.perf_counter()
        deadline = time.monotonic() + wait_s
        if kind in (Cmd.PAUSE, Cmd.SHUTDOWN):
            self._close_rings(kind, epoch, last, deadline)
        if weights is not None:  # before the command: a worker adopting the version reads it then
            self.inst.write_weights(weights)
        cmd_w.write(kind, epoch, aux)
        if kind == Cmd.CLEAR:  # after the command (settled_ledger counts the command word itself from now on)
            ledger_w.write(kind, epoch, pack_ledger(weight_version, cleared | ClearFlags(aux)))
        acks = self._wait_acks(kind, epoch, wait_s, deadline)
        res = StepResult(kind.name, epoch, latency_s=time.perf_counter() - t0)
        if kind == Cmd.CLEAR:
            res.released_bytes = {name: sig.aux for name, sig in acks.items()}
        elif kind == Cmd.RESTORE:
            ledger_w.write(kind, epoch, pack_ledger(aux, ClearFlags(0)))
        return res

    def _wait_acks(self, kind: Cmd, epoch: int, timeout_s: float, deadline: float) -> dict[str, Signal[ActorState]]:
        """Every actor's acknowledgement of ``kind``@``epoch`` by ``deadline`` (the step's: ``timeout_s`` after it
        began)."""
        target = ACK_OF[kind]
        wait_w = self._claim()[2]
        step = f"{kind.name}@{epoch}"
        acks: dict[str, Signal[ActorState]] = {}
        try:
            for rank in range(self.cfg.tp):
                for role in ROLES:
                    slot, who = actor_slot(role, rank), actor_name(role, rank)
                    wait_w.write(WaitKind.ACKS, time.monotonic_ns(), pack_slots([slot]))
                    try:
                        sig = self.inst.status.wait(
                            slot,
                            lambda s: s.value in (S.FAILED, S.STOPPED) or s.at_least(target, epoch),
                            what=f"{who} to acknowledge {step} ({target.name})",
                            timeout_s=max(1e-3, deadline - time.monotonic()),
                        )
                    except PeerDied:
                        raise StepFailed(f"{step} failed: {self.inst.culprits()}") from None
                    except WaitTimeout:
                        chain = self.inst.wait_chain(slot)
                        raise StepFailed(
                            f"{step} failed: {who} did not acknowledge within {timeout_s:g} s: {chain}"
                        ) from None
                    if sig.value == S.FAILED or (sig.value == S.STOPPED and kind != Cmd.SHUTDOWN):
                        raise StepFailed(f"{step} failed: {self.inst.culprits()}")
                    acks[who] = sig
        finally:  # the wait is over, however it ended
            wait_w.write(WaitKind.NONE, time.monotonic_ns(), 0)
        return acks

    def _check_unmapped(self) -> None:
        """After a clear, no actor may still map a device pool of this instance (the memory would not be free)."""
        if self.cfg.backend != "cpu":
            return
        prefix = self.inst.name_of(naming.DEVICE_POOL).lstrip("/")
        for rank in range(self.cfg.tp):
            for role in ROLES:
                pid = self.inst.status.read(actor_slot(role, rank)).writer.pid
                try:
                    with open(f"/proc/{pid}/maps") as f:
                        stale = [line.split()[-2] for line in f if prefix in line]
                except OSError:
                    continue
                if stale:
                    raise StepFailed(f"clear failed: {actor_name(role, rank)} (pid {pid}) still maps {stale[0]}")
