"""The loop every actor runs, whatever its role: read the command, ``decide``, act, publish; serve tasks.

See NOTE [ clear handshake ] in mpkv.handshake for the rules; this module only does the I/O around them:
  - the status slot of (role, rank) is written here and nowhere else, with the command's epoch;
  - pool views are held in ``self.pool`` only, dropped by ``_detach`` — which also runs in ``finally`` on every
    exit path, before FAILED is published (the model check relies on that);
  - one sleep covers every source that can change the decision (command word, task ring, the peers waited
    for) through futex_waitv, so a command is seen within microseconds and an idle actor costs nothing;
  - a wait on a peer has a deadline and ends in FAILED naming that peer, its pid and state;
  - errors cross processes as data: the text goes to the actor's error record, then FAILED is published.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from loguru import logger

from mpkv import _native, layout
from mpkv.actors.entry import fault_point
from mpkv.errors import MpkvError, ProtocolError
from mpkv.handshake import IDLE, Act, Command, Decision, Status, View, decide
from mpkv.instance import CONTROL_COMMAND, Instance
from mpkv.pool import AttachedPool, OwnedPool, allocate_device_pool, attach_device_pool
from mpkv.protocol import (
    DONE_CODEC,
    ROLES,
    TASK_CODEC,
    ActorState,
    Cmd,
    Done,
    Role,
    WaitKind,
    actor_name,
    actor_slot,
    pack_slots,
)
from mpkv.shm.ring import RingReader, RingWriter
from mpkv.shm.signals import Signal, SignalWriter
from mpkv.shm.waiting import SPIN_S

HEARTBEAT_S = 0.5
PEER_TIMEOUT_S = float(os.environ.get("MPKV_PEER_TIMEOUT_S", "60"))
S = ActorState


class TaskError(MpkvError):
    """A task was refused or failed; the message goes back to the client in its completion."""


class Actor:
    """One process of one role of one rank. Subclasses add task handlers and their own resources."""

    role: Role
    handlers: ClassVar[dict[type, Callable[..., Done]]] = {}

    def __init__(self, inst: Instance, rank: int) -> None:
        self.inst, self.rank, self.cfg = inst, rank, inst.cfg
        self.name = actor_name(self.role, rank)
        self.slot = actor_slot(self.role, rank)
        self.is_owner = int(self.cfg.pool_owner) == int(self.role)
        self.owner_role = Role(int(self.cfg.pool_owner))
        self.attacher_roles = [r for r in ROLES if r != self.owner_role]
        self.pool: OwnedPool | AttachedPool | None = None
        self.weight_version = self.cfg.weight_version
        self.device = torch.device("cpu")
        if self.cfg.backend == "cuda":
            self.device = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        self.released_bytes = 0
        self.status: Status = Status(S.BOOTING, 0)
        self._status_w: SignalWriter[ActorState] = inst.status.writer(self.slot)
        self._wait_w: SignalWriter[WaitKind] = inst.waits.writer(self.slot)
        self._waiting: tuple[WaitKind, int] = (WaitKind.NONE, 0)
        self._last_publish = 0.0
        self._last_task = 0.0
        self.tasks: RingReader | None = None
        self.done: RingWriter | None = None
        if self.role in (Role.WORKER, Role.TRANSFER):
            self.tasks = RingReader(inst.task_ring(self.role), rank, label=f"{self.role.name.lower()}:r{rank}")
            self.done = RingWriter(inst.done_ring(self.role, rank), label=f"{self.role.name.lower()}:r{rank}")
        self._publish(self.status)

    # -- hooks for roles --------------------------------------------------------------------------------------------
    def owns_host(self) -> bool:
        return False

    def host_live(self) -> bool:
        return False

    def release_host(self) -> int:  # pragma: no cover - only roles that own a host pool are asked
        raise ProtocolError(f"{self.name} owns no host pool")

    def restore_host(self, epoch: int) -> None:  # pragma: no cover
        raise ProtocolError(f"{self.name} owns no host pool")

    def on_new_weights(self, weight_version: int) -> None:
        """Called when a restore adopts a weight version (the worker loads weights; the transfer manager
        drops host entries of older versions)."""

    # -- status ----------------------------------------------------------------------------------------------
    def _publish(self, st: Status) -> None:
        aux = self.released_bytes if st.state == S.CLEARED else self.weight_version
        self._status_w.write(st.state, st.epoch, aux)
        self.status = st
        self._last_publish = time.monotonic()

    def _peer_slots(self) -> list[int]:
        if self.is_owner:
            return [actor_slot(r, self.rank) for r in self.attacher_roles]
        return [actor_slot(self.owner_role, self.rank)]

    def _peer_status(self, slot: int, check_alive: bool) -> tuple[Status | None, Signal[ActorState]]:
        sig = self.inst.status.read(slot)
        if sig.seq == 0:
            return Status(S.BOOTING, 0), sig  # not started yet: alive as far as we know
        if check_alive and not sig.writer.alive():
            return None, sig
        return Status(sig.value, sig.epoch), sig

    def _command(self) -> Command:
        sig = self.inst.control.read(CONTROL_COMMAND)
        return Command(sig.value, sig.epoch, sig.aux)

    def _view(self, cmd: Command, check_alive: bool = False) -> View:
        peers = tuple(self._peer_status(s, check_alive)[0] for s in self._peer_slots())
        return View(self.status, cmd, self.is_owner, self.pool is not None, self.owns_host(), self.host_live(), peers)

    def _decide(self, cmd: Command) -> Decision:
        """``decide`` on what the slots say; only when that means waiting for a peer, check (reading /proc)
        that the peers are alive, and decide again if one is not: liveness costs nothing on the fast path."""
        d = decide(self._view(cmd))
        if d.action == Act.WAIT and d.waiting_for:
            d = decide(self._view(cmd, check_alive=True))
        return d

    # -- the loop ------------------------------------------------------------------------------------------------------
    def run(self) -> None:
        waiting_since: float | None = None
        idle_on: int | None = None  # the command word's value when we last decided there was nothing to do
        while True:
            snap = self._snapshot()  # before reading anything the decision depends on: no change can be missed
            if idle_on is not None and snap[0][2] == idle_on:
                d = IDLE  # nothing changed that an idle decision depends on: serve tasks without re-deciding
            else:
                cmd = self._command()
                d = self._decide(cmd)
                if d.action != Act.WAIT:
                    waiting_since, idle_on = None, None
                    self._act(d, cmd)
                    continue
                idle_on = None if d.waiting_for else snap[0][2]
            if self.status.state == S.STOPPED:
                return
            if self._serve_one() or self._linger():
                continue
            if d.waiting_for:
                waiting_since = waiting_since or time.monotonic()
                if time.monotonic() - waiting_since > PEER_TIMEOUT_S:
                    raise MpkvError(
                        f"{self.name} waited {PEER_TIMEOUT_S:g} s in {self.status.state.name}@{self.status.epoch} "
                        f"for {self._describe_waits(d)}"
                    )
            else:
                waiting_since = None
            if time.monotonic() - self._last_publish > HEARTBEAT_S:
                self._publish(self.status)  # heartbeat: same state, fresh timestamp
            if d.waiting_for:
                self._note_wait(WaitKind.PEERS, pack_slots([self._peer_slots()[i] for i in d.waiting_for]))
            else:
                self._note_wait(WaitKind.COMMAND, 0)
            self._sleep(snap, d, 0.05 if d.waiting_for else HEARTBEAT_S)

    def _note_wait(self, kind: WaitKind, on: int) -> None:
        """Publish what we wait for (DESIGN I2), only when it changes: the record's epoch is the wait's start."""
        if (kind, on) != self._waiting:
            self._waiting = (kind, on)
            self._wait_w.write(kind, time.monotonic_ns(), on)

    def _describe_waits(self, d: Decision) -> str:
        out = []
        for i in d.waiting_for:
            slot = self._peer_slots()[i]
            _, sig = self._peer_status(slot, check_alive=False)
            out.append(f"{self.inst.status._labels(slot)} [{sig.writer.describe()}; {sig.value.name}@{sig.epoch}]")
        return "; ".join(out)

    def _snapshot(self) -> list[tuple[Any, int, int]]:
        """The futex words that can change our decision, with their values now: [command, peers..., tasks]."""
        words: list[tuple[Any, int, int]] = []
        ctl = self.inst.control.seg.buf
        off = self.inst.control._off(CONTROL_COMMAND)
        words.append((ctl, off, _native.load_u64(ctl, off) & 0xFFFFFFFF))
        sbuf = self.inst.status.seg.buf
        for slot in self._peer_slots():
            off = self.inst.status._off(slot)
            words.append((sbuf, off, _native.load_u64(sbuf, off) & 0xFFFFFFFF))
        if self.tasks is not None:
            tbuf, wpos = self.tasks.seg.buf, layout.ring_writer_pos(layout.SEGMENT_HEADER_BYTES)
            words.append((tbuf, wpos, _native.load_u64(tbuf, wpos) & 0xFFFFFFFF))
        return words

    def _sleep(self, snap: list[tuple[Any, int, int]], d: Decision, timeout_s: float) -> None:
        """Sleep until the command, a waited-for peer or the task ring changes from ``snap`` (or timeout_s).
        Signal writers always wake their word; the ring's writer wakes only readers whose sleeping flag is set,
        so set ours, fence, and re-check the ring before sleeping (eventcount)."""
        words = [snap[0]] + [snap[1 + i] for i in d.waiting_for]
        flag = -1
        if self.tasks is not None:
            words.append(snap[-1])
            tbuf = self.tasks.seg.buf
            flag = layout.ring_reader_meta(layout.SEGMENT_HEADER_BYTES, self.rank) + layout.META_SLEEPING
            _native.store_u32(tbuf, flag, 1)
            _native.fence()
            if _native.load_u64(tbuf, layout.ring_writer_pos(layout.SEGMENT_HEADER_BYTES)) != self.tasks.position:
                _native.store_u32(tbuf, flag, 0)
                return
        _native.wait_any(words, timeout_s)
        if flag >= 0:
            _native.store_u32(self.tasks.seg.buf, flag, 0)  # type: ignore[union-attr]

    def _act(self, d: Decision, cmd: Command) -> None:
        self._note_wait(WaitKind.NONE, 0)
        logger.debug("{} {}@{}: {}", self.name, cmd.kind.name, cmd.epoch, d.action.name)
        fault_point(self.role, self.rank, cmd.kind.name)
        if d.action == Act.FAIL:
            raise MpkvError(f"{self.name} in {cmd.kind.name}@{cmd.epoch}: {d.reason}")
        if cmd.kind == Cmd.CLEAR and self.status.epoch != cmd.epoch:
            self.released_bytes = 0  # a new clear: count what this one releases
        if d.action == Act.ALLOCATE:
            wv = cmd.aux if cmd.kind == Cmd.RESTORE else self.weight_version
            attachers = tuple(int(r) for r in self.attacher_roles)
            pool = allocate_device_pool(self.inst.registry, self.cfg, self.rank, cmd.epoch, wv, attachers)
            self.inst.write_handle(self.rank, pool.handle())
            self.pool = pool
            self._adopt(wv)
        elif d.action == Act.ATTACH:
            handle = self.inst.read_handle(self.rank)
            if handle.epoch != cmd.epoch:
                raise ProtocolError(
                    f"{self.name}: owner published the pool of epoch {handle.epoch}, expected {cmd.epoch}"
                )
            self.pool = attach_device_pool(self.cfg, handle, int(self.role))
            self._adopt(handle.weight_version)
        elif d.action == Act.DETACH:
            self._detach()
        elif d.action == Act.FREE:
            self.released_bytes += self._free()
        elif d.action == Act.RELEASE_HOST:
            self.released_bytes += self.release_host()
        elif d.action == Act.RESTORE_HOST:
            self.restore_host(cmd.epoch)
        elif d.action == Act.DRAIN:
            while self._serve_one():
                pass
        assert d.publish is not None
        if d.publish != self.status:  # an unchanged status would only wake its waiters for nothing
            self._publish(d.publish)

    def _adopt(self, weight_version: int) -> None:
        if weight_version != self.weight_version or self.status.state == S.BOOTING:
            self.weight_version = weight_version
            self.on_new_weights(weight_version)

    def _detach(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None and not self.is_owner:
            pool.close()  # type: ignore[union-attr]

    def _free(self) -> int:
        pool, self.pool = self.pool, None
        return pool.free() if pool is not None else 0  # type: ignore[union-attr]

    def _linger(self) -> bool:
        """Right after serving a task, spin (then yield) for up to SPIN_S on the task ring before sleeping:
        tasks come in bursts, and waking a sleeping process costs far more than the spin (an inter-processor
        interrupt; on a VM, an exit to the hypervisor: ~0.1-0.3 ms measured here). Idle actors never spin."""
        if self.tasks is None or time.monotonic() - self._last_task > 0.01:
            return False
        return self.tasks.spin_for(SPIN_S)

    # -- tasks -----------------------------------------------------------------------------------------------
    def _serve_one(self) -> bool:
        if self.tasks is None:
            return False
        raw = self.tasks.try_get()
        if raw is None:
            return False
        task = TASK_CODEC.decode(raw)
        fault_point(self.role, self.rank, "task")
        handler = self.handlers.get(type(task))
        try:
            if handler is None:
                raise TaskError(f"{self.name} does not take {type(task).__name__} tasks")
            if self.pool is None:
                state = f"{self.status.state.name}@{self.status.epoch}"
                raise TaskError(f"{self.name} has no KV pool now ({state}): the cache is cleared")
            done = handler(self, task)
        except TaskError as e:
            done = Done(task.seq, self.rank, error=str(e), weight_version=self.weight_version)
        assert self.done is not None
        reply = DONE_CODEC.encode(done)
        if len(reply) > self.done.max_payload:
            reply = DONE_CODEC.encode(
                Done(
                    task.seq,
                    self.rank,
                    error=f"{self.name}: the reply is {len(reply)} bytes, more than the completion ring carries "
                    f"({self.done.max_payload}); ask for fewer blocks per task",
                    weight_version=self.weight_version,
                )
            )
        self.done.put(reply, timeout_s=PEER_TIMEOUT_S)
        self._last_task = time.monotonic()
        return True

    # -- teardown --------------------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Runs on every exit path. Attachers drop their views first; the owner frees last."""
        self._detach()
        if self.is_owner:
            self._free()

    def close(self) -> None:
        for port in (self.tasks, self.done):
            if port is not None:
                port.close()
        self.inst.close()
