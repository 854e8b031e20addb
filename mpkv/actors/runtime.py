"""The loop every actor runs, whatever its role: read the command, ``decide``, act, publish; serve tasks.

See NOTE [ clear handshake ] in mpkv.handshake for the rules; this module only does the I/O around them:
  - the status slot of (role, rank) is written here and nowhere else, with the command's epoch;
  - pool views are held in ``self.pool`` only, dropped by ``_detach`` — which also runs in ``finally`` on every
    exit path, before FAILED is published (the model check relies on that);
  - one sleep covers every source that can change the decision (command word, task ring, the peers waited
    for) through futex_waitv, so a command is seen within microseconds and an idle actor costs nothing;
  - a wait on a peer has a deadline and ends in FAILED naming that peer, its pid and state;
  - errors cross processes as data: the text goes to the actor's error record, then FAILED is published.

NOTE [ the cost of a pass ]
An RL step runs four commands through every actor of every rank, so on a small machine the handshake's latency is
the actors' CPU: 12 actors at TP=4 on 2 cores, each pass of this loop paid 12 times. Measured before this note,
an actor spent ~2-3 ms of CPU per pause/clear/restore/resume cycle, 80 % of it in the interpreter (~1,400 Python
calls per cycle, a quarter of them loguru's). So a pass does no work it can skip, and ``decide`` stays the one
pure function the model check drives:
  - ``decide`` is asked once per command: after acting on a command and reaching its acknowledgement, the loop
    idles until the command word changes (what ``decide`` would answer anyway), in the same pass;
  - the command and the peers' statuses are read as raw words; typed records are made only when they changed;
  - liveness (/proc) is read only when a wait for a peer slept out its slice or a heartbeat came due, not on
    every pass that waits: a peer that died without a word is found within that slice;
  - the wake set is made once (while no link comes and goes), and a wait record wakes nobody (nobody sleeps on it);
  - only transitions that take or give back memory are logged at INFO; acknowledgements at DEBUG.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from typing import ClassVar

import torch
from loguru import logger

from mpkv import topology
from mpkv.actors.entry import fault_point
from mpkv.codec import peek
from mpkv.errors import MpkvError, ProtocolError
from mpkv.handshake import IDLE, Act, Command, Decision, Status, View, decide
from mpkv.instance import CONTROL_COMMAND, FENCE_CLOSING, Instance
from mpkv.pool import AttachedPool, OwnedPool, allocate_device_pool, attach_device_pool
from mpkv.protocol import (
    ACK_OF,
    DONE_CODEC,
    LINK_WAIT_BASE,
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
from mpkv.shm.signals import Signal, SignalArray, SignalWriter, TornSlot
from mpkv.shm.waiting import SPIN_S, TIMED_OUT, WakeSet, Word

HEARTBEAT_S = 0.5
PEER_TIMEOUT_S = float(os.environ.get("MPKV_PEER_TIMEOUT_S", "60"))
S = ActorState
# Names by member, one table per enum (IntEnum members of different enums hash alike): .name is a slow property.
_STATE_NAME, _CMD_NAME, _ACT_NAME = ({m: m.name for m in e} for e in (ActorState, Cmd, Act))
# Transitions that take or give back memory are logged at INFO (an actor's log file always records them); the
# others (acknowledgements, drains, mappings) at DEBUG: a loguru line costs ~30-50 us of CPU, several per cycle.
_LOGGED = frozenset({Act.ALLOCATE, Act.FREE, Act.RESTORE_HOST, Act.RELEASE_HOST, Act.LOAD_WEIGHTS, Act.RELEASE_WEIGHTS})


class TaskError(MpkvError):
    """A task was refused or failed; the message goes back to the client in its completion."""


class Actor:
    """One process of one role of one rank. Subclasses add task handlers and their own resources."""

    role: Role
    handlers: ClassVar[dict[type, Callable[..., Done]]] = {}
    poolless: ClassVar[tuple[type, ...]] = ()  # task types whose handler runs (and reports) even without a pool
    ignores: ClassVar[tuple[type, ...]] = ()  # task types on a shared ring that are another role's business

    def __init__(self, inst: Instance, rank: int) -> None:
        self.inst, self.rank, self.cfg = inst, rank, inst.cfg
        self.name = actor_name(self.role, rank)
        self.slot = actor_slot(self.role, rank)
        self.owner_role = topology.pool_owner(self.cfg)
        self.is_owner = self.owner_role == self.role
        self.attacher_roles = list(topology.pool_attachers(self.cfg))
        self.pool: OwnedPool | AttachedPool | None = None
        self.pool_epoch = 0  # the restore epoch of the pool mapped now (its handle's)
        self.weight_version = self.cfg.weight_version
        self.device = torch.device("cpu")
        if self.cfg.backend == "cuda":
            from mpkv.pool.cuda_driver import device_for

            self.device = device_for(rank)
            torch.cuda.set_device(self.device)  # before anything touches CUDA: a rank >= 1 keeps off device 0
        self.released_bytes = 0
        self.status: Status = Status(S.BOOTING, 0)
        self._last_command = Command(Cmd.NONE, 0)
        self._status_w: SignalWriter[ActorState] = inst.status.writer(self.slot)
        self._wait_w: SignalWriter[WaitKind] = inst.waits.writer(self.slot)
        self._waiting: tuple[WaitKind, int] = (WaitKind.NONE, 0)
        self._last_publish = 0.0
        self._last_task = 0.0
        self.tasks: RingReader | None = None
        self.done: RingWriter | None = None
        self.task_pos = 0  # the ring position of the task being served: the same on every reader of the ring
        ends = inst.topology.actor(self.role, rank)  # its rings, its reader index, the peers of its handshake
        if ends.tasks is not None and ends.done is not None:
            label = f"{self.role.name.lower()}:r{rank}"
            self.tasks = RingReader(inst.name_of(ends.tasks), ends.reader, label=label)
            self.done = RingWriter(inst.name_of(ends.done), label=label)
        self.fence_slot = ends.fence  # where the controller says how far this ring drains (PAUSE, SHUTDOWN)
        # The slots this actor's handshake depends on: the owner's attachers (and, on a decode instance, the
        # links into its pool), or an attacher's owner.
        self.peers: list[tuple[SignalArray[ActorState], int]] = [(inst.status, slot) for slot in ends.peers]
        self.peers += [(inst.links, slot) for slot in ends.links]
        # The hot loop's caches (NOTE [ the cost of a pass ]): the typed command and peer statuses by the raw words
        # they were made from, the wake set while no extra word comes and goes, and whether liveness is due.
        self._command_key: tuple[int, int, int] | None = None
        self._peer_keys: list[tuple[int, int] | None] = [None] * len(self.peers)
        self._peer_typed: list[Status | None] = [None] * len(self.peers)
        self._wake: WakeSet | None = None
        self._among: dict[tuple[int, ...], list[int]] = {}
        self._check_peers = True
        self._publish(self.status)

    # -- hooks for roles --------------------------------------------------------------------------------------------
    def owns_host(self) -> bool:
        return False

    def host_live(self) -> bool:
        return False

    def release_host(self) -> int:  # pragma: no cover - only roles that own a host pool are asked
        raise ProtocolError(f"{self.name} owns no host pool")

    def restore_host(self, epoch: int, weight_version: int) -> None:  # pragma: no cover
        raise ProtocolError(f"{self.name} owns no host pool")

    def owns_weights(self) -> bool:
        """Whether this actor holds model weights (the worker: a tier that CLEAR may free)."""
        return False

    def weights_live(self) -> bool:
        return False

    def release_weights(self) -> int:  # pragma: no cover - only the worker is asked
        raise ProtocolError(f"{self.name} holds no weights")

    def load_weights(self) -> None:  # pragma: no cover - only the worker is asked
        raise ProtocolError(f"{self.name} holds no weights")

    def on_task_end(self, task: object) -> None:
        """Called after every task this actor served, whatever its outcome (the worker ends its progress)."""

    def extra_words(self) -> list[Word]:
        """Futex words outside this instance whose change needs this actor's attention (a messager's links)."""
        return []

    def max_sleep_s(self) -> float:
        """The longest this actor may sleep when nothing wakes it (the heartbeat's period by default)."""
        return HEARTBEAT_S

    def reap(self) -> None:
        """Let go of what ``extra_words`` no longer needs, before the loop snapshots those words."""

    def poll(self, check_alive: bool = False) -> None:
        """Look at those words' owners (called on every pass of the loop; ``check_alive`` on heartbeats)."""

    def state_words(self) -> str:
        return f"{self.status.state.name}@{self.status.epoch}"

    def on_new_weights(self, weight_version: int) -> None:
        """Called whenever this actor maps a pool at start-up or at a restore, with the pool's weight version (the
        worker finds out whether it holds that version's weights: if not, the handshake's LOAD_WEIGHTS loads them,
        after the pool is published; the transfer manager drops host entries of other versions)."""

    # -- status ----------------------------------------------------------------------------------------------
    @property
    def status_writer(self) -> SignalWriter[ActorState]:
        """The one writer of this actor's status slot (invariant I1): its entry point publishes the last state
        (STOPPED or FAILED) through it, after the teardown."""
        return self._status_w

    def heartbeat(self) -> bool:
        """Publish the same state with a fresh timestamp if the last one is older than HEARTBEAT_S (also from
        inside a long task: the worker's all-reduce calls it while it waits for the other ranks)."""
        if time.monotonic() - self._last_publish <= HEARTBEAT_S:
            return False
        self._publish(self.status)
        return True

    def _publish(self, st: Status) -> None:
        aux = self.released_bytes if st.state == S.CLEARED else self.weight_version
        self._status_w.write(st.state, st.epoch, aux)
        self.status = st
        self._last_publish = time.monotonic()

    def _peer_status(self, i: int, check_alive: bool) -> tuple[Status | None, Signal[ActorState]]:
        array, slot = self.peers[i]
        sig = array.read_or_dead(slot)  # torn by a writer that died mid-write: that dead writer, as any dead peer
        if sig.seq == 0:
            if array is not self.inst.status:
                return Status(S.STOPPED, 0), sig  # a link never held: it maps nothing
            return Status(S.BOOTING, 0), sig  # not started yet: alive as far as we know
        if check_alive and not sig.writer.alive():
            return None, sig
        return Status(sig.value, sig.epoch), sig

    def _peer_statuses(self, check_alive: bool) -> tuple[Status | None, ...]:
        """Every peer's status (None: dead, known only when ``check_alive``). Without a liveness check, a peer whose
        slot holds the same (value, epoch) as last time gets the same Status object back."""
        if check_alive:
            return tuple(self._peer_status(i, True)[0] for i in range(len(self.peers)))
        out = []
        for i, (array, slot) in enumerate(self.peers):
            try:
                seq, value, epoch = array.raw(slot)[:3]
            except TornSlot:
                seq = value = epoch = 0
            if seq and (value, epoch) == self._peer_keys[i]:
                out.append(self._peer_typed[i])
                continue
            # The typed, checked read (a slot never written, torn or new), and the key of that very read: a link's
            # state is not monotone, so a key from the raw read above could name another write than the status.
            st, sig = self._peer_status(i, False)
            self._peer_keys[i] = (int(sig.value), sig.epoch) if sig.seq and sig.value != 0 else None
            self._peer_typed[i] = st
            out.append(st)
        return tuple(out)

    def _command(self) -> Command:
        try:
            words = self.inst.control.raw(CONTROL_COMMAND)
        except TornSlot:  # the controller died writing it: that command never happened; the next one repairs it
            return self._last_command
        if (words[1], words[2], words[6]) != self._command_key:
            sig = self.inst.control.read(CONTROL_COMMAND)  # typed and checked, once per new command
            self._last_command = Command(sig.value, sig.epoch, sig.aux)
            self._command_key = (int(sig.value), sig.epoch, sig.aux)
        return self._last_command

    def _view(self, cmd: Command, check_alive: bool = False) -> View:
        mapped = self.pool is not None  # a mapped pool's weight version is the one adopted with it (``_adopt``)
        return View(
            self.status,
            cmd,
            self.is_owner,
            mapped,
            self.weight_version,
            self.owns_host(),
            self.host_live(),
            self._peer_statuses(check_alive),
            self.owns_weights(),
            self.weights_live(),
        )

    def _decide(self, cmd: Command) -> Decision:
        """``decide`` on what the slots say. Whether the peers are alive (reading /proc) is checked only when a
        wait for them slept out its slice or a heartbeat came due (``_check_peers``): a peer that died without a
        word is found within that slice, and liveness costs nothing on the fast path."""
        check, self._check_peers = self._check_peers, False
        return decide(self._view(cmd, check_alive=check))

    # -- the loop ------------------------------------------------------------------------------------------------------
    def run(self) -> None:
        waiting_since: float | None = None
        idle_on: int | None = None  # the command word's value when we last decided there was nothing to do
        while True:
            self.reap()
            wake = self._wake_set()
            command_word = wake.snapshot()[0]  # before reading anything the decision depends on: no change missed
            self.poll()  # after the snapshot too: a change it misses still wakes the sleep below
            if idle_on is not None and command_word == idle_on:
                d = IDLE  # nothing changed that an idle decision depends on: serve tasks without re-deciding
            else:
                cmd = self._command()
                d = self._decide(cmd)
                if d.action != Act.WAIT:
                    waiting_since = None
                    self._act(d, cmd)
                    if not (self.status.epoch == cmd.epoch and self.status.state >= ACK_OF[cmd.kind]):
                        idle_on = None
                        continue  # more to do for this command: decide again at once
                    # Acknowledged: ``decide`` answers IDLE until the command word changes, so it is not asked again,
                    # and this pass goes on to tasks and sleep (its snapshot predates the command it just read).
                    d, idle_on = IDLE, command_word
                idle_on = None if d.waiting_for else command_word
            if self.status.state == S.STOPPED:
                return
            if self._serve_one() or self._linger():
                continue
            if d.waiting_for:
                waiting_since = waiting_since or time.monotonic()
                if time.monotonic() - waiting_since > 0.05:
                    self._check_peers = True  # a wait that lasts: look at the peers' liveness (tasks may keep coming)
                if time.monotonic() - waiting_since > PEER_TIMEOUT_S:
                    raise MpkvError(
                        f"{self.name} waited {PEER_TIMEOUT_S:g} s in {self.status.state.name}@{self.status.epoch} "
                        f"for {self._describe_waits(d)}"
                    )
            else:
                waiting_since = None
            if self.heartbeat():
                self.poll(check_alive=True)
                self._check_peers = True
            if d.waiting_for:
                self._note_wait(WaitKind.PEERS, pack_slots([self._wait_code(i) for i in d.waiting_for[:4]]))
            else:
                self._note_wait(WaitKind.COMMAND, 0)
            self._sleep(wake, d, min(0.05 if d.waiting_for else HEARTBEAT_S, self.max_sleep_s()))

    def _note_wait(self, kind: WaitKind, on: int) -> None:
        """Publish what we wait for (invariant I2), only when it changes: the record's epoch is the wait's start."""
        if (kind, on) != self._waiting:
            self._waiting = (kind, on)
            self._wait_w.write(kind, time.monotonic_ns(), on, wake=False)  # read by people, slept on by nobody

    def _wait_code(self, i: int) -> int:
        """How a wait record names peer i: its status slot, or LINK_WAIT_BASE + its link slot."""
        array, slot = self.peers[i]
        return slot if array is self.inst.status else LINK_WAIT_BASE + slot

    def _describe_waits(self, d: Decision) -> str:
        out = []
        for i in d.waiting_for:
            array, slot = self.peers[i]
            _, sig = self._peer_status(i, check_alive=False)
            out.append(f"{array.label(slot)} [{sig.writer.describe()}; {sig.value.name}@{sig.epoch}]")
        return "; ".join(out)

    def _wake_set(self) -> WakeSet:
        """The futex words that can change our decision, by index: [command, peers..., extra words..., tasks].
        Made once while there are no extra words; a messager's links come and go, and a cached set would keep a
        link's memory referenced after ``reap`` let it go, so with extra words it is made anew each pass."""
        extra = self.extra_words()
        if self._wake is not None and not extra:
            return self._wake
        wake = WakeSet()
        wake.add(self.inst.control.word(CONTROL_COMMAND))
        for array, slot in self.peers:
            wake.add(array.word(slot))
        for word in extra:
            wake.add(word)
        if self.tasks is not None:
            wake.add(self.tasks.wake_word())
        self._wake = None if extra else wake
        self._among.clear()
        return wake

    def _sleep(self, wake: WakeSet, d: Decision, timeout_s: float) -> None:
        """Sleep until the command, a waited-for peer, an extra word or the task ring changes from the snapshot
        (or timeout_s). Peers we do not wait for are left out: their heartbeats would only wake us. A wait for
        peers that sleeps out its slice checks their liveness on the next pass."""
        among = self._among.get(d.waiting_for)
        if among is None:
            npeers = len(self.peers)
            among = self._among[d.waiting_for] = [0, *(1 + i for i in d.waiting_for), *range(1 + npeers, len(wake))]
        if wake.sleep(timeout_s, among) == TIMED_OUT and d.waiting_for:
            self._check_peers = True

    def _act(self, d: Decision, cmd: Command) -> None:
        self._note_wait(WaitKind.NONE, 0)
        fault_point(self.role, self.rank, _CMD_NAME[cmd.kind])
        if d.action == Act.FAIL:
            raise MpkvError(f"{self.name} in {cmd.kind.name}@{cmd.epoch}: {d.reason}")
        if cmd.kind == Cmd.CLEAR and self.status.epoch != cmd.epoch:
            self.released_bytes = 0  # a new clear: count what this one releases
        if d.action == Act.ALLOCATE:
            wv = cmd.aux if cmd.kind == Cmd.RESTORE else self.weight_version
            pool = allocate_device_pool(self.inst.registry, self.cfg, self.rank, cmd.epoch, wv)
            self.inst.write_handle(self.rank, pool.handle())
            self.pool = pool
            self.pool_epoch = cmd.epoch
            self._adopt(wv)
        elif d.action == Act.ATTACH:
            # The owner acknowledged PUBLISHED@e, so its handle is the pool it maps now: allocated at this restore,
            # or at an earlier try of it that timed out (a retried RESTORE keeps that pool), never a freed one.
            handle = self.inst.read_handle(self.rank)
            wv = cmd.aux if cmd.kind == Cmd.RESTORE else self.weight_version
            if handle.epoch > cmd.epoch or handle.weight_version != wv:
                raise ProtocolError(
                    f"{self.name}: owner published the pool of epoch {handle.epoch} for weight version "
                    f"{handle.weight_version}; expected one of epoch <= {cmd.epoch} for weight version {wv}"
                )
            self.pool = attach_device_pool(self.cfg, handle)
            self.pool_epoch = handle.epoch
            self._adopt(handle.weight_version)
        elif d.action == Act.DETACH:
            self._detach()
        elif d.action == Act.FREE:
            self.released_bytes += self._free()
        elif d.action == Act.RELEASE_HOST:
            self.released_bytes += self.release_host()
        elif d.action == Act.RESTORE_HOST:
            self.restore_host(cmd.epoch, cmd.aux if cmd.kind == Cmd.RESTORE else self.weight_version)
        elif d.action == Act.RELEASE_WEIGHTS:
            self.released_bytes += self.release_weights()
        elif d.action == Act.LOAD_WEIGHTS:
            self.load_weights()
        elif d.action == Act.DRAIN:
            self._drain(cmd)
        assert d.publish is not None
        if d.publish != self.status:  # an unchanged status would only wake its waiters for nothing
            self._publish(d.publish)
        # Logged once done (mpkv-top shows the last few): a step that hangs or fails half-way never shows here.
        log = logger.info if d.action in _LOGGED else logger.debug
        to = f"{_STATE_NAME[d.publish.state]}@{d.publish.epoch}"
        log("transition {} {}@{}: {} -> {}", self.name, _CMD_NAME[cmd.kind], cmd.epoch, _ACT_NAME[d.action], to)

    def _drain(self, cmd: Command) -> None:
        """Serve every task of the ring below the command's drain fence, and none beyond: every reader of the ring
        (the same role on every rank; on a prefill instance the messagers too) serves exactly the same tasks
        before it pauses or stops (NOTE [ submission gate ] in mpkv.shm.ring)."""
        if self.tasks is None:
            return
        fence = self.inst.control.read(self.fence_slot)
        if (fence.value, fence.epoch) != (cmd.kind, cmd.epoch) or fence.aux == FENCE_CLOSING:
            # A controller that publishes no fence (docs/control-block.md makes it optional): what is there now.
            while self._serve_one():
                pass
            return
        while self.tasks.position < fence.aux:
            if not self._serve_one():
                raise ProtocolError(
                    f"{self.name}: {cmd.kind.name}@{cmd.epoch} drains tasks up to ring position {fence.aux}, but the "
                    f"ring ends at {self.tasks.position}"
                )

    def _adopt(self, weight_version: int) -> None:
        # Also for the version held: a restore that timed out after some workers loaded a publication of it may
        # be followed by a clear and a newer publication of that same version (the worker compares publications).
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
        pos = self.tasks.position
        raw = self.tasks.try_get()
        if raw is None:
            return False
        self.task_pos = pos
        try:
            task = TASK_CODEC.decode(raw)
        except ProtocolError as e:
            # Every reader of the ring sees the same bytes, so every rank fails this task alike; the actor lives on.
            return self._refuse_undecodable(bytes(raw), e)
        if isinstance(task, self.ignores):
            return True
        fault_point(self.role, self.rank, "task")
        handler = self.handlers.get(type(task))
        try:
            if handler is None:
                raise TaskError(f"{self.name} does not take {type(task).__name__} tasks")
            if self.pool is None and not isinstance(task, self.poolless):
                raise TaskError(f"{self.name} has no KV pool now ({self.state_words()}): the cache is cleared")
            done = handler(self, task)
        except TaskError as e:
            done = Done(task.seq, self.rank, error=str(e), weight_version=self.weight_version)
        finally:
            self.on_task_end(task)
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

    def _refuse_undecodable(self, raw: bytes, error: ProtocolError) -> bool:
        seq, tag = peek(raw)
        logger.error("{}: task {} at ring position {} cannot be used: {}", self.name, seq, self.task_pos, error)
        if seq is not None and tag not in {t.__name__ for t in self.ignores}:  # another role's task: it answers
            assert self.done is not None
            done = Done(seq, self.rank, error=f"{self.name}: task {seq} cannot be decoded: {error}")
            self.done.put(DONE_CODEC.encode(done), timeout_s=PEER_TIMEOUT_S)
        return True

    # -- teardown --------------------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Runs on every exit path. Attachers drop their views first; the owner frees last. A failure's traceback
        may sit in a reference cycle that holds pool views: collected first, so the views are really gone (else
        closing refuses, and FAILED would show while the mapping stays)."""
        gc.collect()
        self._detach()
        if self.is_owner:
            self._free()

    def close(self) -> None:
        for port in (self.tasks, self.done):
            if port is not None:
                port.close()
        self.inst.close()
