"""What reaches users about an instance, as typed records, and the one way each is put into words.

The records are msgspec Structs: `mpkv ctl NAME status --json` and `mpkv-top --once --json` print their
``msgspec.json`` encoding (the keys are the field names; docs/mpkv-top.md is the schema). mpkv.status and mpkv.top
fill them from shared memory; this module reads nothing itself, so the wait-for chain and the text lines are
pure functions of the records, and the same records always read the same way:

- ``wait_chain`` is the only walk of the wait-for graph (the controller's "did not acknowledge" diagnosis through
  ``Instance.wait_chain``, and mpkv-top's long-wait and cycle problems);
- ``status_lines`` is the only rendering of an instance's status (`mpkv ctl NAME status` prints it, mpkv-top
  puts it in its panel and adds what only it reads: queues, pools, transfers, problems).

Names are ``who``: "worker r0", or "launcher" (rank -1). Durations are seconds (``_s``), sizes bytes (``_bytes``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec

from mpkv.gpumem import DeviceMemory, fmt_bytes

SCHEMA = "mpkv-top/1"


class Wait(msgspec.Struct, frozen=True):
    """What a process published it waits for: ``kind`` a WaitKind name (NONE: running, COMMAND: idle, PEERS: the
    handshake, ACKS: the controller, PROGRESS, BARRIER: a prefill messager), ``on`` whom, ``since_s`` for how long
    (None with NONE)."""

    kind: str
    on: tuple[str, ...] = ()
    since_s: float | None = None

    @property
    def blocked(self) -> bool:
        """Waiting for someone (the waits the wait-for graph follows), not running or idle."""
        return self.kind not in ("NONE", "COMMAND") and bool(self.on)


NO_WAIT = Wait("NONE")


class ActorStatus(msgspec.Struct, frozen=True):
    """One actor (or the launcher: role "launcher", rank -1) as its status slot, its process and its error
    record show it. ``state``@``epoch`` is the last acknowledged ActorState; ``aux`` that acknowledgement's
    detail (CLEAR: bytes released; RESTORE: weight version); ``pid`` 0 and ``heartbeat_age_s`` None: it never
    published; ``process_state`` what /proc says of that pid ("alive, sleeping", "alive, stopped", "dead");
    ``gpu_bytes`` the GPU memory NVML attributes to the pid, over every device, its CUDA context included (None:
    a cpu instance, NVML not available, or the process is not alive; ``InstanceStatus.gpu_note`` says why)."""

    role: str
    rank: int
    pid: int
    alive: bool
    process_state: str
    state: str
    epoch: int
    aux: int
    heartbeat_age_s: float | None
    error: str
    waiting_for: Wait = NO_WAIT
    gpu_bytes: int | None = None

    @property
    def who(self) -> str:
        return self.role if self.rank < 0 else f"{self.role} r{self.rank}"

    @property
    def broken(self) -> bool:
        """Dead without having stopped, or FAILED: the instance cannot go on (``ctl status`` exits 1)."""
        return self.state == "FAILED" or (bool(self.pid) and not self.alive and self.state != "STOPPED")


class CommandStatus(msgspec.Struct, frozen=True):
    """The controller's last command word: a Cmd name, its epoch, its argument (RESTORE: the weight version;
    CLEAR: the ClearFlags)."""

    kind: str
    epoch: int
    aux: int


class StepStatus(msgspec.Struct, frozen=True):
    """Whether every actor acknowledged the last command; if not, who has not ("transfer r1 (PAUSED@3)", "(dead)").
    Until it is done only a retry of that step, a full clear or a shutdown is admitted (handshake.check_command)."""

    done: bool
    pending: tuple[str, ...]


class InstanceStatus(msgspec.Struct, frozen=True):
    """`mpkv ctl NAME status --json`: an instance's command, ledger, step and every actor (rank-major), and on a
    cuda instance the GPUs' free and total memory as NVML numbers them (PCI order, every GPU of the machine).
    ``gpu_note``: why GPU figures are n/a ("n/a: cpu backend", "n/a: <why NVML is not available>") or what they
    need said (pids NVML does not list; see mpkv.gpumem); "" when nothing."""

    instance: str
    run_id: str
    config: dict[str, Any]  # CacheConfig.to_json's fields
    command: CommandStatus
    step: StepStatus
    weight_version: int  # of the KV in the pools (the ledger, with what the last command settled)
    cleared: tuple[str, ...]  # ClearFlags names cleared since the last restore
    launcher: ActorStatus
    controller_waiting_for: Wait
    actors: tuple[ActorStatus, ...]
    gpu_devices: tuple[DeviceMemory, ...] = ()
    gpu_note: str = ""

    def actor(self, who: str) -> ActorStatus | None:
        return next((a for a in (self.launcher, *self.actors) if a.who == who), None)


class Queue(msgspec.Struct, frozen=True):
    """One reader of one ring: bytes written and not yet read by it (``written_bytes`` only grows)."""

    ring: str
    reader: str
    pending_bytes: int
    capacity_bytes: int
    written_bytes: int


class Pools(msgspec.Struct, frozen=True):
    """Per rank: pool sizes, and host slots in use as each transfer manager publishes it (None: host tier cleared)."""

    device_blocks: int
    host_blocks: int
    host_slots_in_use: tuple[int | None, ...]
    device_bytes_per_rank: int
    host_bytes_per_rank: int
    weight_version: int
    cleared: tuple[str, ...]


class LayerProgress(msgspec.Struct, frozen=True):
    """A prefill worker's per-layer progress (protocol.Progress name, its task position, layers done)."""

    rank: int
    state: str
    position: int
    layers_done: int


class LeaseInFlight(msgspec.Struct, frozen=True):
    lease: int
    generation: int
    pool_epoch: int


class LinkStatus(msgspec.Struct, frozen=True):
    """Link ``link`` into rank ``rank`` of a decode instance, held by a prefill messager (pid)."""

    link: int
    rank: int
    state: str
    epoch: int
    pid: int
    alive: bool


class Transfers(msgspec.Struct, frozen=True, omit_defaults=True):
    """Prefill instances: ``progress``; decode instances: ``leases`` (count per LeaseState name), ``in_flight``,
    ``links`` (open ones); a mixed instance has neither (the fields are left out of the JSON)."""

    progress: tuple[LayerProgress, ...] | None = None
    leases: dict[str, int] | None = None
    in_flight: tuple[LeaseInFlight, ...] | None = None
    links: tuple[LinkStatus, ...] | None = None


class Problem(msgspec.Struct, frozen=True):
    """``kind``: dead, failed, stale_heartbeat, long_wait or cycle; ``actor`` who has it; ``message`` the diagnosis."""

    kind: str
    actor: str
    message: str


class InstanceView(InstanceStatus, frozen=True, kw_only=True, omit_defaults=True):
    """mpkv-top's instance: its status plus what only mpkv-top reads. ``state``: live, starting or stale;
    ``error`` (left out when empty): why it is stale though its launcher runs (objects half torn down)."""

    state: str
    log_dir: str
    pools: Pools
    queues: tuple[Queue, ...]
    transfers: Transfers
    problems: tuple[Problem, ...]
    error: str = ""


class Vanished(msgspec.Struct, frozen=True):
    """An instance that went away (or never was) while mpkv-top looked: why it could not be read."""

    instance: str
    error: str
    state: str = "vanished"


class Snapshot(msgspec.Struct, frozen=True):
    """`mpkv-top --once --json` (schema ``SCHEMA``): ``taken_at`` is Unix time."""

    schema: str
    taken_at: float
    instances: tuple[InstanceView | Vanished, ...]


def to_json(record: msgspec.Struct) -> str:
    """The JSON users read (`--json`): the record's msgspec encoding, indented."""
    return msgspec.json.format(msgspec.json.encode(record), indent=2).decode()


# -- the wait-for chain ----------------------------------------------------------------------------------------------
def _head(a: ActorStatus) -> str:
    return f"{a.who} (pid {a.pid} ({a.process_state}); {a.state}@{a.epoch})"


def describe(a: ActorStatus) -> str:
    """Where a chain of waits ends: the actor dead, FAILED, or running (and whether its heartbeat is recent)."""
    if a.pid and not a.alive:
        return f"{a.who} (pid {a.pid}) is {a.process_state}, last {a.state}@{a.epoch}"
    if a.state == "FAILED":
        return f"{a.who} (pid {a.pid}) FAILED: {a.error or 'no error recorded'}"
    hb = "" if a.heartbeat_age_s is None else f"; heartbeat {a.heartbeat_age_s:.1f} s ago"
    return f"{_head(a)} is not waiting for a peer (it published {a.waiting_for.kind}{hb})"


def wait_chain(start: str, actors: Mapping[str, ActorStatus]) -> tuple[str, bool]:
    """Follow the published waits from ``start`` (a ``who``) to whoever waits for nobody: "worker r0 (pid 7
    (alive, sleeping); PAUSED@1) waits for messager r0 since 2.9 s; messager r0 (...) is not waiting for a peer
    (...)". Returns the text and whether the chain came back to an actor on it (a cycle: the handshake rules it
    out, so it is reported, not assumed away). Only the first of several awaited peers is followed: any one of them
    not moving is reason enough, and one chain stays readable."""
    hops: list[str] = []
    seen: set[str] = set()
    who = start
    while who not in seen:
        seen.add(who)
        a = actors.get(who)
        if a is None:  # a link: its holder is a prefill instance's messager, in that instance's status
            hops.append(f"{who} is held from outside this instance (a prefill instance's messager: see that instance)")
            return "; ".join(hops), False
        w = a.waiting_for
        if not w.blocked or not a.alive:  # a dead process's last published wait is history
            hops.append(describe(a))
            return "; ".join(hops), False
        hops.append(f"{_head(a)} waits for {', '.join(w.on)} since {w.since_s or 0:.1f} s")
        who = w.on[0]
    return "; ".join(hops) + f"; which closes a cycle back to {who}", True


def actor_map(st: InstanceStatus) -> dict[str, ActorStatus]:
    return {a.who: a for a in st.actors}


def unhealthy(st: InstanceStatus) -> list[str]:
    """The launcher and actors that are broken (``ActorStatus.broken``: FAILED, or dead without having stopped),
    named ("transfer r0 (pid 7) is dead"); empty: healthy. An actor still booting (no pid yet) is not broken."""
    return [
        f"{a.who} (pid {a.pid}) is {'FAILED' if a.state == 'FAILED' else 'dead'}"
        for a in (st.launcher, *st.actors)
        if a.broken
    ]


def culprits(st: InstanceStatus) -> str:
    """Who broke the instance: actors that FAILED (with their error's first line) or died without stopping. Once one
    is gone the launcher stops the others (they show STOPPED): those are named last, if at all. (A launcher that
    died is named before all of them by ``Instance.culprits``: its actors exit with it.)"""
    broken = [
        f"{a.who} (pid {a.pid}) FAILED: {a.error or 'no error recorded'}"
        if a.state == "FAILED"
        else f"{a.who} died: pid {a.pid} is {a.process_state} (last state {a.state}@{a.epoch})"
        for a in st.actors
        if a.broken
    ]
    stopped = [a.who for a in st.actors if a.state == "STOPPED"]
    if not broken:
        return f"the instance was stopped ({', '.join(stopped) or 'no actor stopped yet'})"
    return "; ".join(broken) + (f" (then the launcher stopped {', '.join(stopped)})" if stopped else "")


# -- the one renderer --------------------------------------------------------------------------------------------
class Line(NamedTuple):
    """One line of text; ``alarm``: it shows something broken (mpkv-top paints it red)."""

    text: str
    alarm: bool = False


def _waits_text(w: Wait) -> str:
    if w.kind == "NONE":
        return ""
    if w.kind == "COMMAND":
        return "idle"
    since = "" if w.since_s is None else f" since {w.since_s:.1f}s"
    return f"waits for {', '.join(w.on)} ({w.kind.lower()}){since}"


def actor_line(a: ActorStatus) -> Line:
    hb = "-" if a.heartbeat_age_s is None else f"{a.heartbeat_age_s:.1f}s"
    life = "alive" if a.alive else "DEAD"
    text = (
        f"  {a.who:12} pid {a.pid:<8} {a.state + '@' + str(a.epoch):12} heartbeat {hb:>6}  {life:5}  "
        f"gpu {fmt_bytes(a.gpu_bytes):>9}  {_waits_text(a.waiting_for):24} {a.error}"
    )
    return Line(text.rstrip(), a.broken)


def gpu_line(st: InstanceStatus) -> Line:
    """The GPUs' free memory ("  GPU memory free: #0 120.5 GiB of 139.8 GiB (NVIDIA H200)"), or why it is n/a."""
    if not st.gpu_devices:
        return Line(f"  GPU memory: n/a ({st.gpu_note.removeprefix('n/a: ') or 'not reported'})")
    free = ", ".join(f"#{d.index} {fmt_bytes(d.free_bytes)} of {fmt_bytes(d.total_bytes)}" for d in st.gpu_devices)
    names = ", ".join(dict.fromkeys(d.name for d in st.gpu_devices))
    return Line(f"  GPU memory free: {free} ({names})" + (f"; {st.gpu_note}" if st.gpu_note else ""))


def status_lines(st: InstanceStatus) -> list[Line]:
    """An instance's status as text: a head line, the step still pending (if any), the GPUs' free memory, one
    line per process."""
    cfg = st.config
    lines = [
        Line(
            f"instance {st.instance} run {st.run_id}: {cfg['pd_role']} tp={cfg['tp']} {cfg['backend']}, command "
            f"{st.command.kind}@{st.command.epoch}, weight version {st.weight_version}, cleared "
            f"{','.join(st.cleared) or '-'}, logs {cfg['log_dir'] or '-'}"
        )
    ]
    if not st.step.done:
        lines.append(
            Line(
                f"  step {st.command.kind}@{st.command.epoch} not acknowledged by {', '.join(st.step.pending)}: "
                "only a retry of it, a full clear or shutdown is admitted",
                alarm=True,
            )
        )
    lines.append(gpu_line(st))
    lines += [actor_line(a) for a in (st.launcher, *st.actors)]
    return lines
