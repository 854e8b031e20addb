"""`mpkv-top` (also `mpkv top`): every instance of this user on the machine, live, from shared memory alone.

It maps every segment read-only (``segment.read_only_process``: a write would fault), never takes a claim, never
waits on an instance's words, and treats an instance that appears, vanishes or is half torn down while it looks
as data ("vanished", "stale"; a booting one is "starting"), not as an error. Other users' segments are refused
by the attach checks.

The snapshot (``--once --json``) is versioned: report.SCHEMA, documented in docs/mpkv-top.md. It is the
records of mpkv.report: per instance, `mpkv ctl status --json` (one reader, mpkv.status) plus queues, pools,
transfers and problems; its text is `mpkv ctl status`'s (one renderer, report.status_lines) plus lines for those.
Problems come from one pure function of an instance's status (``problems``): a dead or FAILED process, a heartbeat
older than HEARTBEAT_STALE_S, a wait older than WAIT_LONG_S, a cycle in the wait-for graph, each with its chain
spelled out by report.wait_chain ("transfer r1 (...) waits for worker r1 since 12.3 s; worker r1 (pid 7) is dead,
last PAUSED@3").
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import termios
import time
import tty
from typing import Any

import msgspec

from mpkv import _native, layout, naming
from mpkv.cli import DefaultsHelpFormatter, quiet_on_broken_pipe
from mpkv.errors import AttachError, MpkvError
from mpkv.instance import MAX_LEASES, MAX_LINKS, Instance
from mpkv.layout import SegmentKind
from mpkv.protocol import HostTier, LeaseState, PdRole
from mpkv.report import (
    SCHEMA,
    ActorStatus,
    InstanceStatus,
    InstanceView,
    LayerProgress,
    LeaseInFlight,
    Line,
    LinkStatus,
    Pools,
    Problem,
    Queue,
    Snapshot,
    Transfers,
    Vanished,
    actor_map,
    describe,
    status_lines,
    to_json,
    wait_chain,
)
from mpkv.shm.segment import Segment, read_only_process
from mpkv.status import read_status

HEARTBEAT_STALE_S = 3.0  # actors heartbeat every 0.5 s
WAIT_LONG_S = 5.0
_HDR = layout.SEGMENT_HEADER_BYTES


def instance_names() -> list[str]:
    return sorted({n for n in (naming.instance_of(x) for x in naming.list_names() if naming.is_registry(x)) if n})


# -- the snapshot ------------------------------------------------------------------------------------------------
def _ring_depths(inst: Instance) -> tuple[Queue, ...]:
    """Unread bytes per reader of every task and completion ring (positions only: loads, nothing else)."""
    out = []
    rings = [(o.obj, o.readers) for o in inst.topology.rings()]  # the shape from the one table
    for obj, readers in rings:
        seg = Segment.attach(inst.name_of(obj), SegmentKind.RING)
        try:
            capacity = _native.load_u64(seg.buf, _HDR)
            written = _native.load_u64(seg.buf, layout.ring_writer_pos(_HDR))
            for i, who in enumerate(readers):
                pending = written - _native.load_u64(seg.buf, layout.ring_reader_pos(_HDR, i))
                out.append(Queue(obj, who, pending_bytes=pending, capacity_bytes=capacity, written_bytes=written))
        finally:
            seg.close()
    return tuple(out)


def _transfers(inst: Instance) -> Transfers:
    cfg = inst.cfg
    if cfg.pd_role == PdRole.PREFILL:
        progress = [(r, inst.progress.read(r)) for r in range(cfg.tp)]
        return Transfers(progress=tuple(LayerProgress(r, p.value.name, p.epoch, p.aux) for r, p in progress))
    if cfg.pd_role != PdRole.DECODE:
        return Transfers()
    counts = {s.name: 0 for s in LeaseState if s != LeaseState.FREE}
    in_flight = []
    for i in range(MAX_LEASES):
        lease = inst.leases.read(i)
        if lease.seq and lease.value != LeaseState.FREE:
            counts[lease.value.name] += 1
            if lease.value == LeaseState.GRANTED:
                in_flight.append(LeaseInFlight(i, generation=lease.epoch, pool_epoch=lease.aux))
    links = []
    for j in range(MAX_LINKS):
        for r in range(cfg.tp):
            sig = inst.links.read(inst.link_slot(j, r))
            if sig.seq and sig.value.name != "STOPPED":
                links.append(LinkStatus(j, r, sig.value.name, sig.epoch, sig.writer.pid, sig.writer.alive()))
    return Transfers(leases=counts, in_flight=tuple(in_flight), links=tuple(links))


def _pools(inst: Instance, st: InstanceStatus) -> Pools:
    cfg = inst.cfg
    host = [inst.usage.read(r) for r in range(cfg.tp)]
    return Pools(
        device_blocks=cfg.device_blocks,
        host_blocks=cfg.host_blocks,
        host_slots_in_use=tuple(h.epoch if h.value == HostTier.LIVE else None for h in host),
        device_bytes_per_rank=cfg.pool_bytes(cfg.device_blocks),
        host_bytes_per_rank=cfg.pool_bytes(cfg.host_blocks),
        weight_version=st.weight_version,
        cleared=st.cleared,
    )


def _instance_state(launcher: ActorStatus) -> str:
    """live: the launcher is alive and READY; starting: it is alive and still BOOTING (it turns READY once every
    actor is READY@0); stale: anything else (the launcher dead, stopping or FAILED)."""
    if launcher.alive and launcher.state in ("READY", "BOOTING"):
        return "live" if launcher.state == "READY" else "starting"
    return "stale"


def _view(inst: Instance) -> InstanceView:
    st = read_status(inst)
    state, error = _instance_state(st.launcher), ""
    try:
        queues, transfers = _ring_depths(inst), _transfers(inst)
    except (AttachError, MpkvError, OSError, ValueError) as e:  # torn down under us, half-way
        queues, transfers = (), Transfers()
        state, error = "stale", f"partly torn down: {e}"
    return InstanceView(
        **msgspec.structs.asdict(st),
        state=state,
        log_dir=inst.cfg.log_dir,
        pools=_pools(inst, st),
        queues=queues,
        transfers=transfers,
        problems=problems(st),
        error=error,
    )


def instance_snapshot(name: str) -> InstanceView | Vanished:
    """One instance as data; never raises for an instance that vanished or is half torn down."""
    try:
        inst = Instance.attach(name)
    except (AttachError, MpkvError, OSError, ValueError) as e:
        return Vanished(name, str(e))
    try:
        return _view(inst)
    except (AttachError, MpkvError, OSError, ValueError, BufferError) as e:
        return Vanished(name, str(e))
    finally:
        try:
            inst.close()
        except (MpkvError, BufferError, ValueError):
            pass


def snapshot(name: str | None = None) -> Snapshot:
    names = [name] if name else instance_names()
    return Snapshot(SCHEMA, time.time(), tuple(instance_snapshot(n) for n in names))


# -- problems: a pure function of one instance's status ---------------------------------------------------------
def problems(st: InstanceStatus) -> tuple[Problem, ...]:
    """Dead, FAILED and silent actors, and every wait older than WAIT_LONG_S with its chain (``wait_chain``)."""
    actors = actor_map(st)
    out: list[Problem] = []
    for who, a in actors.items():
        if a.pid and not a.alive and a.state != "STOPPED":
            out.append(Problem("dead", who, describe(a)))
        elif a.state == "FAILED":
            out.append(Problem("failed", who, describe(a)))
        elif a.alive and a.heartbeat_age_s is not None and a.heartbeat_age_s > HEARTBEAT_STALE_S:
            out.append(Problem("stale_heartbeat", who, describe(a) + " (hung or stopped?)"))
    waiters = [("controller", st.controller_waiting_for), *((who, a.waiting_for) for who, a in actors.items())]
    for who, wait in waiters:
        if wait.blocked and (wait.since_s or 0) > WAIT_LONG_S:
            text, cyclic = wait_chain(wait.on[0], actors)
            head = f"{who} waits for {', '.join(wait.on)} since {wait.since_s:.1f} s"
            out.append(Problem("cycle" if cyclic else "long_wait", who, f"{head}; {text}"))
    return tuple(out)


def recent_transitions(log_dir: str, n: int = 6) -> list[str]:
    """The last ``n`` handshake transitions the actors logged (their log files; empty if there are none)."""
    lines: list[str] = []
    try:
        files = naming.actor_logs(log_dir)
    except OSError:
        return []
    for path in files:
        try:
            with open(path, errors="replace") as f:
                lines += [line.rstrip() for line in f.readlines()[-50:] if " transition " in line]
        except OSError:
            continue
    return sorted(lines)[-n:]


# -- the live view -------------------------------------------------------------------------------------------------
def rates(snap: Snapshot, prev: Snapshot | None) -> dict[tuple[str, str], float]:
    """Bytes/s written into each ring between two snapshots: (instance, ring) -> rate."""
    if prev is None:
        return {}
    dt = snap.taken_at - prev.taken_at
    before = {
        (e.instance, q.ring): q.written_bytes for e in prev.instances if isinstance(e, InstanceView) for q in e.queues
    }
    out = {}
    for e in snap.instances:
        for q in e.queues if isinstance(e, InstanceView) else ():
            key = (e.instance, q.ring)
            if key in before and dt > 0 and q.written_bytes >= before[key]:
                out[key] = (q.written_bytes - before[key]) / dt
    return out


def view_lines(e: InstanceView, flow: dict[tuple[str, str], float]) -> list[Line]:
    """An instance in mpkv-top: ``status_lines`` (what `mpkv ctl NAME status` prints), then what only mpkv-top
    reads: queues, rates, pools, transfers, problems."""
    lines = status_lines(e)
    busy = [q for q in e.queues if q.pending_bytes]
    lines.append(
        Line("queues: " + (", ".join(f"{q.ring}->{q.reader} {q.pending_bytes} B" for q in busy) or "all drained"))
    )
    moving = sorted((k[1], v) for k, v in flow.items() if k[0] == e.instance and v > 0)
    if moving:
        lines.append(Line("rates: " + ", ".join(f"{ring} {v / 1e3:.1f} kB/s" for ring, v in moving)))
    p = e.pools
    lines.append(
        Line(
            f"pools per rank: device {p.device_blocks} blocks ({p.device_bytes_per_rank / 2**20:.1f} MiB), host "
            f"{p.host_blocks} blocks ({p.host_bytes_per_rank / 2**20:.1f} MiB); host slots in use per rank: "
            f"{', '.join('cleared' if n is None else str(n) for n in p.host_slots_in_use)}"
        )
    )
    tr = e.transfers
    if tr.leases is not None:
        counts = ", ".join(f"{n} {state}" for state, n in tr.leases.items())
        lines.append(Line(f"transfers in: leases {counts}, links {len(tr.links or ())} open"))
    if tr.progress is not None:
        done = ", ".join(f"r{p.rank} {p.layers_done} layers ({p.state})" for p in tr.progress)
        lines.append(Line(f"worker progress: {done}"))
    if e.error:
        lines.append(Line(e.error, alarm=True))
    lines += [Line(f"PROBLEM {pr.kind}: {pr.message}", alarm=True) for pr in e.problems]
    return lines


def render(snap: Snapshot, prev: Snapshot | None = None) -> Any:
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    parts: list[Any] = []
    flow = rates(snap, prev)
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.taken_at))
    parts.append(Text(f"mpkv-top  {stamp}  {len(snap.instances)} instance(s)   q: quit", style="bold"))
    if not snap.instances:
        parts.append(Text("no mpkv instance of this user is running here"))
    for e in snap.instances:
        if isinstance(e, Vanished):
            parts.append(Panel(Text(f"vanished: {e.error}", style="dim"), title=Text(e.instance)))
            continue
        rows: list[Any] = [
            Text(line.text, style="bold red" if line.alarm else "", no_wrap=not line.alarm, overflow="ellipsis")
            for line in view_lines(e, flow)
        ]
        for line in recent_transitions(e.log_dir, 4):
            rows.append(Text(line.replace(" INFO transition ", " "), style="dim", no_wrap=True, overflow="ellipsis"))
        look = {"live": "bold", "starting": "bold cyan"}.get(e.state, "bold yellow")
        title = Text(f"{e.instance} [{e.state}]", style=look)
        parts.append(Panel(Group(*rows), title=title, title_align="left"))
    return Group(*parts)


def live(name: str | None, interval_s: float) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    fd = sys.stdin.fileno() if sys.stdin.isatty() else -1
    saved = termios.tcgetattr(fd) if fd >= 0 else None
    try:
        if fd >= 0:
            tty.setcbreak(fd)  # keys arrive one by one, unechoed; restored in finally
        prev = snapshot(name)
        with Live(render(prev), console=console, screen=True, auto_refresh=False) as view:
            while True:
                ready, _, _ = select.select([fd] if fd >= 0 else [], [], [], interval_s)
                if ready and os.read(fd, 1) in (b"q", b"Q", b"\x1b"):
                    return 0
                snap = snapshot(name)
                view.update(render(snap, prev), refresh=True)
                prev = snap
    except KeyboardInterrupt:
        return 0
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _once(name: str | None, as_json: bool) -> int:
    snap = snapshot(name)
    if as_json:
        print(to_json(snap))
    else:
        from rich.console import Console

        Console().print(render(snap))
    return 1 if name and isinstance(snap.instances[0], Vanished) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mpkv-top",
        description="Watch mpkv instances: every actor, wait and queue.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("name", nargs="?", help="one instance (default: every instance of this user)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--json", action="store_true", help="with --once: the snapshot as JSON (schema mpkv-top/1)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    args = p.parse_args(argv)
    read_only_process()
    if args.once or args.json:
        return quiet_on_broken_pipe(lambda: _once(args.name, args.json))
    if args.interval <= 0:
        p.error("--interval must be positive")
    return live(args.name, args.interval)


if __name__ == "__main__":
    sys.exit(main())
