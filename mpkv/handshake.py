"""The clear/restore handshake as a pure state machine: (what an actor sees) -> (what it does next).

NOTE [ clear handshake ]
The controller writes one command word (``Cmd``, epoch, aux). Every actor of every rank acknowledges in its own
status slot with the same epoch; nobody else writes there (invariant I1). Per rank one role owns the device pool
(``PoolOwner``); the other two attach to it. The rules, per command at epoch e:

    start-up   owner: allocate, publish handle -> PUBLISHED@0 -> READY@0
               attacher: allocate its host pool if it owns one, wait owner >= PUBLISHED@0, attach -> READY@0
    PAUSE      everyone: finish or fail every task already read -> PAUSED@e
    CLEAR      attacher: drop every view of the device pool -> DETACHED@e; release its host pool if it owns one,
                         a worker its model weights if the clear names them -> CLEARED@e.  Waits for nobody.
               owner:    wait every live attacher >= DETACHED@e (a dead one holds no mapping; a FAILED one
                         dropped its views before it published FAILED), free the pool -> CLEARED@e
    RESTORE    owner:    allocate a fresh pool (a new name: no stale view can alias it), publish -> PUBLISHED@e
                         -> RESTORED@e.  Waits for nobody.
               a worker (owner or attacher) without the weights of the version it now maps (they were cleared,
               or it adopts a new version) loads them after PUBLISHED@e and before RESTORED@e (LOAD_WEIGHTS):
               an owner publishes its pool first, so its attachers never wait out the load.
               attacher: allocate its host pool if it owns one (at once: in parallel with the owner's
                         allocation), wait owner >= PUBLISHED@e, attach -> RESTORED@e
    RESUME     everyone -> READY@e
    SHUTDOWN   drain as PAUSE (-> PAUSED@e), then as CLEAR, ending in STOPPED@e

So in every phase the wait-for relation is a DAG (clear: owner -> attachers; restore: attachers -> owner;
the controller waits for everyone and nobody waits for the controller except for its next command), and no
two processes ever wait for each other: the reference's hang (seed 001: worker and transfer manager both
waiting for ``cache_ready_signal == 0``) has no counterpart here. Freeing happens in exactly one place (the
owner's FREE) and detaching in exactly one place (the attacher's DETACH), on every path, including shutdown
and failure (the runtime detaches in ``finally`` before it publishes FAILED).

A step the controller gave up on (it failed or timed out) is not over for the actors: they go on with the command
word they see. So the controller admits its next command on what the actors acknowledged (``step_done``), not on
what it asked for: until every actor acknowledged, the only ways out are retrying the step, a full clear or a
shutdown (``check_command``). An actor that still maps a pool of another weight version when it sees RESTORE
fails by name instead of serving that pool under the new version (``_bring_up``): a controller in another language
that skips these rules cannot make stale KV look fresh.

The runtime (``mpkv.actors.runtime``) reads the command and statuses from shared memory, calls ``decide``,
performs the action, then publishes ``Decision.publish``. ``tests/test_handshake_model.py`` explores every
interleaving of a controller, an owner and up to three attachers through these same functions, with a crash
injected at every point.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from mpkv.protocol import ACK_OF, ActorState, ClearFlags, Cmd

S = ActorState
FULL_CLEAR = ClearFlags.DEVICE | ClearFlags.HOST  # both KV tiers: a way out of any unfinished step


@dataclass(frozen=True)
class Command:
    kind: Cmd
    epoch: int
    aux: int = 0

    @property
    def flags(self) -> ClearFlags:
        return ClearFlags(self.aux & 7) if self.kind == Cmd.CLEAR else ClearFlags.DEVICE | ClearFlags.HOST


@dataclass(frozen=True)
class Status:
    state: ActorState
    epoch: int

    def at_least(self, state: ActorState, epoch: int) -> bool:
        return self.epoch > epoch or (self.epoch == epoch and self.state >= state)


class Act(enum.IntEnum):
    WAIT = 0  # nothing to do until something changes; ``Decision.waiting_for`` says on whom
    ACK = 1  # publish, no side effect
    DRAIN = 2  # finish or fail the tasks already read, then publish
    DETACH = 3  # drop every view of the device pool, then publish
    FREE = 4  # owner: free the device pool, then publish
    ALLOCATE = 5  # owner: allocate a fresh device pool and publish its handle, then publish
    ATTACH = 6  # attacher: map the owner's published pool, then publish
    RELEASE_HOST = 7  # free this actor's host pool (if it owns one), then publish
    RESTORE_HOST = 8  # re-allocate this actor's host pool (if it owns one) for the new weight version
    FAIL = 9  # publish FAILED with ``reason``
    RELEASE_WEIGHTS = 10  # a worker: drop its model weights, then publish
    LOAD_WEIGHTS = 11  # a worker: load the weights of the weight version it serves, then publish


@dataclass(frozen=True)
class View:
    """Everything one actor needs to decide. ``peers`` are the statuses of the other actors of its rank that
    matter to it: for the owner, its attachers (on a decode instance also the links into its pool); for an
    attacher, the owner. None marks a dead process."""

    me: Status
    cmd: Command
    is_owner: bool
    mapped: bool  # this actor holds views of the device pool now
    pool_version: int  # ... and the weight version that pool was allocated for (meaningless when not mapped)
    owns_host: bool  # this actor owns a host pool
    host_live: bool  # ... and it is allocated now
    peers: Sequence[Status | None]
    owns_weights: bool = False  # this actor runs the model (a worker)
    weights_live: bool = False  # ... and holds the weights of the version it serves (they were not cleared)


@dataclass(frozen=True)
class Decision:
    action: Act
    publish: Status | None = None
    waiting_for: tuple[int, ...] = ()  # indexes into View.peers
    reason: str = ""


IDLE = Decision(Act.WAIT)


def _freed_view(p: Status | None, epoch: int) -> bool:
    """An attacher no longer maps the pool at ``epoch``: it said so, it failed or stopped (it detached before it
    published that), or it died. A link (a prefill messager mapping this decode pool, NOTE [ links ] in
    mpkv.pd.link) shows STOPPED whenever it holds no view, and announces itself before it maps again."""
    return p is None or p.state in (S.FAILED, S.STOPPED) or p.at_least(S.DETACHED, epoch)


def decide(v: View) -> Decision:
    """What the actor of view ``v`` does next. An action after which nothing would be left but acknowledging the
    command publishes that acknowledgement itself: one publication (and one wake-up of whoever waits on it)
    instead of two. Peers wait on monotone predicates (``at_least``), so a later state satisfies them too."""
    d = _next(v)
    if d.publish is None or d.action in (Act.ACK, Act.DRAIN, Act.FAIL, Act.WAIT):
        return d
    then = _next(_after(v, d.action, d.publish))
    return Decision(d.action, then.publish) if then.action == Act.ACK else d


def _after(v: View, a: Act, me: Status) -> View:
    """The view once action ``a`` was carried out and ``me`` published (the runtime's effects, as the model check
    applies them). Built field by field: ``decide`` runs on every actor's hot path."""
    mapped, version, host, weights = v.mapped, v.pool_version, v.host_live, v.weights_live
    if a in (Act.DETACH, Act.FREE):
        mapped = False
    elif a in (Act.RELEASE_HOST, Act.RESTORE_HOST):
        host = a == Act.RESTORE_HOST
    elif a in (Act.RELEASE_WEIGHTS, Act.LOAD_WEIGHTS):
        weights = a == Act.LOAD_WEIGHTS
    else:  # ALLOCATE, ATTACH: the pool of the command's weight version is mapped and adopted. Whether a worker
        # still holds the right weights then is known only after it adopted the pool: it compares publications, not
        # versions (a version may be published again after a restore that timed out). So it decides again.
        mapped, version = True, v.cmd.aux if v.cmd.kind == Cmd.RESTORE else v.pool_version
        weights = False
    return View(me, v.cmd, v.is_owner, mapped, version, v.owns_host, host, v.peers, v.owns_weights, weights)


def _next(v: View) -> Decision:
    me, cmd = v.me, v.cmd
    if me.state in (S.FAILED, S.STOPPED):
        return IDLE
    target = ACK_OF[cmd.kind]
    if me.epoch == cmd.epoch and me.state >= target:
        return IDLE
    if me.epoch > cmd.epoch:  # pragma: no cover - epochs come from the one controller and only grow
        return Decision(Act.FAIL, reason=f"actor is at epoch {me.epoch}, ahead of the command's {cmd.epoch}")
    e = cmd.epoch
    if cmd.kind in (Cmd.NONE, Cmd.RESTORE):
        return _bring_up(v, e, target)
    if cmd.kind in (Cmd.PAUSE, Cmd.RESUME):
        return Decision(Act.DRAIN if cmd.kind == Cmd.PAUSE else Act.ACK, Status(target, e))
    if cmd.kind == Cmd.SHUTDOWN and not me.at_least(S.PAUSED, e):
        # Drain first, as for PAUSE: every rank serves the same tasks before it stops, so ranks that meet at a
        # barrier per task (prefill messagers) never stop at different tasks.
        return Decision(Act.DRAIN, Status(S.PAUSED, e))
    return _tear_down(v, e, target, cmd.flags)


def _bring_up(v: View, e: int, target: ActorState) -> Decision:
    if v.mapped and v.cmd.kind == Cmd.RESTORE and v.pool_version != v.cmd.aux:
        # Only a controller that skipped an unfinished CLEAR can get here (``check_command`` refuses that): serving
        # the old pool under the new version's name would break I7, so refuse, by name, before touching anything.
        return Decision(
            Act.FAIL,
            reason=f"RESTORE@{e} to weight version {v.cmd.aux} while this actor still maps the device pool of weight "
            f"version {v.pool_version}: the device clear before it never completed here",
        )
    if v.is_owner:
        if not v.mapped:
            return Decision(Act.ALLOCATE, Status(S.PUBLISHED, e))
        if not v.me.at_least(S.PUBLISHED, e):  # kept its pool (a retry, a clear of other tiers): say so first
            return Decision(Act.ACK, Status(S.PUBLISHED, e))
    else:
        if not v.mapped:
            owner = v.peers[0]
            if owner is None:
                return Decision(Act.FAIL, reason="the pool owner died before it published the pool")
            if owner.state == S.FAILED:
                return Decision(Act.FAIL, reason="the pool owner failed before it published the pool")
            if v.owns_host and not v.host_live:
                # Its own memory first, while the owner allocates the device pool: a restore costs the larger of
                # the two allocations, not their sum. Nothing to say yet: the status stays as it is.
                return Decision(Act.RESTORE_HOST, v.me)
            if not owner.at_least(S.PUBLISHED, e):
                return Decision(Act.WAIT, waiting_for=(0,))
            return Decision(Act.ATTACH, Status(S.PUBLISHED, e))
    if v.owns_host and not v.host_live:
        return Decision(Act.RESTORE_HOST, Status(S.PUBLISHED, e))
    if v.owns_weights and not v.weights_live:
        return Decision(Act.LOAD_WEIGHTS, Status(S.PUBLISHED, e))
    return Decision(Act.ACK, Status(target, e))


def _tear_down(v: View, e: int, target: ActorState, flags: ClearFlags) -> Decision:
    if ClearFlags.DEVICE in flags and v.mapped:
        if not v.is_owner:
            return Decision(Act.DETACH, Status(S.DETACHED, e))
        waiting = tuple(i for i, p in enumerate(v.peers) if not _freed_view(p, e))
        if waiting:
            return Decision(Act.WAIT, waiting_for=waiting)
        return Decision(Act.FREE, Status(S.DETACHED, e))
    if ClearFlags.HOST in flags and v.owns_host and v.host_live:
        return Decision(Act.RELEASE_HOST, Status(S.DETACHED, e))
    if ClearFlags.WEIGHTS in flags and v.owns_weights and v.weights_live:
        return Decision(Act.RELEASE_WEIGHTS, Status(S.DETACHED, e))
    return Decision(Act.ACK, Status(target, e))


# --- links: attachers from another instance (NOTE [ links ] in mpkv.pd.link) -----------------------------------


def link_may_map(cmd: Command, owner: Status | None) -> bool:
    """A link that announced itself (BOOTING@cmd.epoch) may map the pool: the instance serves the pool of this
    command (running or paused, not cleared) and the owner acknowledged the command."""
    return (
        owner is not None
        and cmd.kind in (Cmd.NONE, Cmd.RESUME, Cmd.PAUSE)
        and owner.epoch == cmd.epoch
        and owner.state == ACK_OF[cmd.kind]
    )


def link_must_unmap(cmd: Command) -> bool:
    """The instance is clearing its device pool or stopping: every link lets go (and shows STOPPED)."""
    return cmd.kind == Cmd.SHUTDOWN or (cmd.kind == Cmd.CLEAR and ClearFlags.DEVICE in cmd.flags)


# --- the controller's side ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """Why the controller will not issue a command now, or that it needs not (``already``)."""

    message: str
    already: bool = False


def acknowledged(cmd: Command, s: Status | None) -> bool:
    """One actor (None: dead) acknowledged ``cmd``. A stopped actor has exited: it acknowledged a retried SHUTDOWN
    already."""
    if s is None or s.state == S.FAILED:
        return False
    return s.at_least(ACK_OF[cmd.kind], cmd.epoch) or (cmd.kind == Cmd.SHUTDOWN and s.state == S.STOPPED)


def step_done(cmd: Command, statuses: Sequence[Status | None]) -> bool:
    """Every actor (of every rank) acknowledged ``cmd``. The controller's next command is admitted on this, not on
    what it asked for before: a step that failed or timed out is not done until the actors say so."""
    return all(acknowledged(cmd, s) for s in statuses)


def settled_ledger(cmd: Command, done: bool, cleared: ClearFlags, weight_version: int) -> tuple[ClearFlags, int]:
    """What is cleared and which weight version the pools hold, given the controller's ledger and its last command:
    a CLEAR counts from the moment it is in the command word (done or not: never a cleared pool that looks ready),
    a RESTORE once every actor acknowledged it (its controller may have given up waiting before they all had). The
    command word, not the ledger, is what the actors act on: a controller that died between writing one and the
    other cannot make the ledger claim a clear that was never issued."""
    if cmd.kind == Cmd.CLEAR:
        return cleared | cmd.flags, weight_version
    if cmd.kind == Cmd.RESTORE and done:
        return ClearFlags(0), cmd.aux
    return cleared, weight_version


def check_command(
    kind: Cmd, aux: int, last: Command, cleared: ClearFlags, weight_version: int, done: bool = True
) -> Refusal | None:
    """Pure admission rules for a new command, given the last command issued, whether every actor acknowledged it
    (``step_done``), what is cleared now (since the last restore, counted from the moment a clear is asked for)
    and the weight version the KV in the pools belongs to (``settled_ledger``).

    A step that is not done (it failed or timed out, and the actors have not caught up) leaves the instance in
    between: its only ways out are retrying that very step, a full clear (after a clear or a restore) or a
    shutdown. Anything else could run over memory the actors still hold: a RESTORE after an unfinished CLEAR would
    find the old pools mapped and keep serving them under the new weight version."""
    if last.kind == Cmd.SHUTDOWN:
        if kind == Cmd.SHUTDOWN:
            return Refusal("already shut down", already=True) if done else None
        return Refusal("the instance is shutting down")
    if not done:
        full_clear = kind == Cmd.CLEAR and ClearFlags(aux) & FULL_CLEAR == FULL_CLEAR
        if kind == Cmd.SHUTDOWN or (kind, aux) == (last.kind, last.aux):
            return None
        if full_clear and last.kind in (Cmd.CLEAR, Cmd.RESTORE):
            return None
        if last.kind == Cmd.NONE:
            return Refusal("the instance is still starting (not every actor is READY yet): wait, or shut it down")
        ways = f"retry {last.kind.name.lower()}"
        if last.kind in (Cmd.CLEAR, Cmd.RESTORE):
            ways += ", clear both tiers"
        return Refusal(
            f"the last step, {last.kind.name}@{last.epoch}, was not acknowledged by every actor (it failed or timed "
            f"out): {ways} or shut down"
        )
    paused = last.kind in (Cmd.PAUSE, Cmd.CLEAR, Cmd.RESTORE)
    if kind == Cmd.PAUSE and paused:
        return Refusal("already paused", already=True)
    if kind == Cmd.RESUME:
        if cleared:
            return Refusal(f"cannot resume: the KV cache is cleared ({cleared!r}); restore it first")
        if not paused:
            return Refusal("already running", already=True)
    if kind == Cmd.CLEAR:
        if not paused:
            return Refusal("cannot clear a running instance: pause it first (in-flight tasks are drained then)")
        if cleared & aux == aux:
            return Refusal("already cleared", already=True)
    if kind == Cmd.RESTORE:
        if not paused:
            return Refusal("cannot restore a running instance: pause and clear it first")
        if not cleared:
            if aux == weight_version:
                return Refusal(f"already restored (weight version {weight_version})", already=True)
            return Refusal(
                f"cannot restore weight version {aux}: the KV cache of weight version {weight_version} is still "
                "live; clear it first, so that no KV of an older version survives"
            )
        if aux != weight_version and ClearFlags.DEVICE not in cleared:
            return Refusal(
                f"cannot restore weight version {aux}: the device KV of weight version {weight_version} is still "
                "live; clear the device tier first"
            )
    return None
