"""`mpkv-top` (also `mpkv top`): every instance of this user on the machine, live, from shared memory alone.

It maps every segment read-only (``segment.read_only_process``: a write would fault), never takes a claim, never
waits on an instance's words, and treats an instance that appears, vanishes or is half torn down while it looks
as data ("vanished", "stale"; a booting one is "starting"), not as an error. Other users' segments are refused
by the attach checks.

The snapshot (``--once --json``) is versioned: SCHEMA below, documented in docs/mpkv-top.md. Its per-instance
part is `mpkv ctl status --json` (one function, mpkv.status) plus queues, pools, transfers and problems.
Problems come from one pure function of a snapshot (``problems``): a dead or FAILED process, a heartbeat older
than HEARTBEAT_STALE_S, a wait older than WAIT_LONG_S, a cycle in the wait-for graph, each with its chain spelled
out ("transfer r1 waits for worker r1 since 12.3 s; worker r1 is dead").
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import termios
import time
import tty
from typing import Any

from mpkv import _native, layout, naming
from mpkv.cli import DefaultsHelpFormatter, quiet_on_broken_pipe
from mpkv.errors import AttachError, MpkvError
from mpkv.instance import MAX_LEASES, MAX_LINKS, Instance
from mpkv.layout import SegmentKind
from mpkv.protocol import HostTier, LeaseState, PdRole, Role
from mpkv.shm.segment import Segment, read_only_process
from mpkv.status import instance_status

SCHEMA = "mpkv-top/1"
HEARTBEAT_STALE_S = 3.0  # actors heartbeat every 0.5 s
WAIT_LONG_S = 5.0
_HDR = layout.SEGMENT_HEADER_BYTES


def instance_names() -> list[str]:
    return sorted({n for n in (naming.instance_of(x) for x in naming.list_names() if naming.is_registry(x)) if n})


# -- the snapshot ------------------------------------------------------------------------------------------------
def _ring_depths(inst: Instance) -> list[dict[str, Any]]:
    """Unread bytes per reader of every task and completion ring (positions only: loads, nothing else)."""
    out = []
    prefill = inst.cfg.pd_role == PdRole.PREFILL
    rings: list[tuple[str, list[str]]] = []
    for role in (Role.WORKER, Role.TRANSFER):
        readers = [f"{role.name.lower()} r{r}" for r in range(inst.cfg.tp)]
        if prefill and role == Role.WORKER:
            readers += [f"messager r{r}" for r in range(inst.cfg.tp)]
        rings.append((f"tasks.{role.name.lower()}", readers))
    for role in (Role.WORKER, Role.TRANSFER, *((Role.MESSAGER,) if prefill else ())):
        for r in range(inst.cfg.tp):
            rings.append((f"done.{role.name.lower()}.r{r}", ["client"]))
    for obj, readers in rings:
        seg = Segment.attach(inst.name_of(obj), SegmentKind.RING)
        try:
            capacity = _native.load_u64(seg.buf, _HDR)
            written = _native.load_u64(seg.buf, layout.ring_writer_pos(_HDR))
            for i, who in enumerate(readers):
                pending = written - _native.load_u64(seg.buf, layout.ring_reader_pos(_HDR, i))
                q = {"ring": obj, "reader": who, "pending_bytes": pending, "capacity_bytes": capacity}
                out.append(q | {"written_bytes": written})
        finally:
            seg.close()
    return out


def _transfers(inst: Instance) -> dict[str, Any]:
    cfg = inst.cfg
    out: dict[str, Any] = {}
    if cfg.pd_role == PdRole.PREFILL:
        out["progress"] = []
        for r in range(cfg.tp):
            p = inst.progress.read(r)
            out["progress"].append({"rank": r, "state": p.value.name, "position": p.epoch, "layers_done": p.aux})
    if cfg.pd_role == PdRole.DECODE:
        counts = {s.name: 0 for s in LeaseState if s != LeaseState.FREE}
        in_flight = []
        for i in range(MAX_LEASES):
            lease = inst.leases.read(i)
            if lease.seq and lease.value != LeaseState.FREE:
                counts[lease.value.name] += 1
                if lease.value == LeaseState.GRANTED:
                    in_flight.append({"lease": i, "generation": lease.epoch, "pool_epoch": lease.aux})
        links = []
        for j in range(MAX_LINKS):
            for r in range(cfg.tp):
                sig = inst.links.read(inst.link_slot(j, r))
                if sig.seq and sig.value.name != "STOPPED":
                    links.append(
                        {
                            "link": j,
                            "rank": r,
                            "state": sig.value.name,
                            "epoch": sig.epoch,
                            "pid": sig.writer.pid,
                            "alive": sig.writer.alive(),
                        }
                    )
        out |= {"leases": counts, "in_flight": in_flight, "links": links}
    return out


def _instance_state(launcher: dict[str, Any]) -> str:
    """live: the launcher is alive and READY; starting: it is alive and still BOOTING (it turns READY once every
    actor is READY@0); stale: anything else (the launcher dead, stopping or FAILED)."""
    if launcher["alive"] and launcher["state"] in ("READY", "BOOTING"):
        return "live" if launcher["state"] == "READY" else "starting"
    return "stale"


def instance_snapshot(name: str) -> dict[str, Any]:
    """One instance as data; never raises for an instance that vanished or is half torn down."""
    try:
        inst = Instance.attach(name)
    except (AttachError, MpkvError, OSError, ValueError) as e:
        return {"instance": name, "state": "vanished", "error": str(e)}
    try:
        entry = instance_status(inst)
        cfg = inst.cfg
        host = [inst.usage.read(r) for r in range(cfg.tp)]
        entry["pools"] = {
            "device_blocks": cfg.device_blocks,
            "host_blocks": cfg.host_blocks,
            "host_slots_in_use": [h.epoch if h.value == HostTier.LIVE else None for h in host],
            "device_bytes_per_rank": cfg.pool_bytes(cfg.device_blocks),
            "host_bytes_per_rank": cfg.pool_bytes(cfg.host_blocks),
            "weight_version": entry["weight_version"],
            "cleared": entry["cleared"],
        }
        entry["log_dir"] = cfg.log_dir
        launcher = entry["launcher"]
        entry["state"] = _instance_state(launcher)
        try:
            entry["queues"] = _ring_depths(inst)
            entry["transfers"] = _transfers(inst)
        except (AttachError, MpkvError, OSError, ValueError) as e:  # torn down under us, half-way
            entry["queues"], entry["transfers"] = [], {}
            entry["state"], entry["error"] = "stale", f"partly torn down: {e}"
        entry["problems"] = problems(entry)
        return entry
    except (AttachError, MpkvError, OSError, ValueError, BufferError) as e:
        return {"instance": name, "state": "vanished", "error": str(e)}
    finally:
        try:
            inst.close()
        except (MpkvError, BufferError, ValueError):
            pass


def snapshot(name: str | None = None) -> dict[str, Any]:
    names = [name] if name else instance_names()
    return {"schema": SCHEMA, "taken_at": time.time(), "instances": [instance_snapshot(n) for n in names]}


# -- problems: a pure function of one instance's snapshot ------------------------------------------------------------
def _who(a: dict[str, Any]) -> str:
    return a["role"] if a["rank"] < 0 else f"{a['role']} r{a['rank']}"


def problems(entry: dict[str, Any]) -> list[dict[str, Any]]:
    actors = {_who(a): a for a in entry.get("actors", [])}
    out: list[dict[str, Any]] = []

    def describe(who: str) -> str:
        a = actors.get(who)
        if a is None:
            return who
        if not a["alive"] and a["pid"]:
            return f"{who} (pid {a['pid']}) is dead, last {a['state']}@{a['epoch']}"
        if a["state"] == "FAILED":
            return f"{who} (pid {a['pid']}) FAILED: {a['error']}"
        age = a["heartbeat_age_s"]
        hb = f", heartbeat {age:.1f} s ago" if age is not None else ""
        return f"{who} (pid {a['pid']}) is {a['state']}@{a['epoch']}{hb}"

    def chain(start: str) -> tuple[str, bool]:
        hops, seen, who = [], set(), start
        while True:
            seen.add(who)
            a = actors.get(who)
            wait = (a or {}).get("waiting_for", {})
            on = wait.get("on") or []
            if not on or wait.get("kind") in ("NONE", "COMMAND"):
                hops.append(describe(who))
                return "; ".join(hops), False
            hops.append(f"{who} waits for {', '.join(on)} since {wait['since_s']:.1f} s")
            if on[0] in seen:
                return "; ".join(hops) + f"; which closes a cycle back to {on[0]}", True
            who = on[0]

    for who, a in actors.items():
        if a["pid"] and not a["alive"] and a["state"] != "STOPPED":
            out.append({"kind": "dead", "actor": who, "message": describe(who)})
        elif a["state"] == "FAILED":
            out.append({"kind": "failed", "actor": who, "message": describe(who)})
        elif a["alive"] and a["heartbeat_age_s"] is not None and a["heartbeat_age_s"] > HEARTBEAT_STALE_S:
            out.append({"kind": "stale_heartbeat", "actor": who, "message": describe(who) + " (hung or stopped?)"})
    waiters = [("controller", entry.get("controller_waiting_for", {}))]
    waiters += [(who, a.get("waiting_for", {})) for who, a in actors.items()]
    for who, wait in waiters:
        if wait.get("kind") in (None, "NONE", "COMMAND") or not wait.get("on"):
            continue
        if wait.get("since_s", 0) > WAIT_LONG_S:
            text, cyclic = chain(wait["on"][0])
            head = f"{who} waits for {', '.join(wait['on'])} since {wait['since_s']:.1f} s"
            out.append({"kind": "cycle" if cyclic else "long_wait", "actor": who, "message": f"{head}; {text}"})
    return out


def recent_transitions(log_dir: str, n: int = 6) -> list[str]:
    """The last ``n`` handshake transitions the actors logged (their log files; empty if there are none)."""
    lines: list[str] = []
    try:
        files = [os.path.join(log_dir, f) for f in os.listdir(log_dir) if f.endswith(".log")]
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
def rates(snap: dict[str, Any], prev: dict[str, Any] | None) -> dict[tuple[str, str], float]:
    """Bytes/s written into each ring between two snapshots: (instance, ring) -> rate."""
    if prev is None:
        return {}
    dt = snap["taken_at"] - prev["taken_at"]
    before = {(e["instance"], q["ring"]): q["written_bytes"] for e in prev["instances"] for q in e.get("queues", [])}
    out = {}
    for e in snap["instances"]:
        for q in e.get("queues", []):
            key = (e["instance"], q["ring"])
            if key in before and dt > 0 and q["written_bytes"] >= before[key]:
                out[key] = (q["written_bytes"] - before[key]) / dt
    return out


def render(snap: dict[str, Any], prev: dict[str, Any] | None = None) -> Any:
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    flow = rates(snap, prev)
    stamp = time.strftime("%H:%M:%S", time.localtime(snap["taken_at"]))
    parts.append(Text(f"mpkv-top  {stamp}  {len(snap['instances'])} instance(s)   q: quit", style="bold"))
    if not snap["instances"]:
        parts.append(Text("no mpkv instance of this user is running here"))
    for e in snap["instances"]:
        if e.get("state") == "vanished":
            parts.append(Panel(Text(f"vanished: {e.get('error', '')}", style="dim"), title=Text(e["instance"])))
            continue
        cfg = e["config"]
        head = (
            f"{cfg['pd_role']} tp={cfg['tp']} {cfg['backend']}  "
            f"command {e['command']['kind']}@{e['command']['epoch']}  weights v{e['weight_version']}  "
            f"cleared {','.join(e['cleared']) or '-'}  run {e['run_id']}  logs {e.get('log_dir') or '-'}"
        )
        t = Table(expand=True, show_edge=False)
        for col in ("actor", "pid", "state", "heartbeat", "waits for", "since", "error"):
            t.add_column(col, no_wrap=col != "error")
        for a in [e["launcher"], *e["actors"]]:
            w = a.get("waiting_for", {"kind": "NONE"})
            waits = {"NONE": "", "COMMAND": "idle"}.get(w["kind"], f"{w['kind'].lower()}: {', '.join(w.get('on', []))}")
            since = f"{w['since_s']:.1f}s" if w.get("since_s") is not None and w["kind"] != "NONE" else ""
            hb = "-" if a["heartbeat_age_s"] is None else f"{a['heartbeat_age_s']:.1f}s"
            style = "red" if (a["pid"] and not a["alive"] and a["state"] != "STOPPED") or a["state"] == "FAILED" else ""
            t.add_row(_who(a), str(a["pid"]), f"{a['state']}@{a['epoch']}", hb, waits, since, a["error"], style=style)
        rows: list[Any] = [Text(head), t]
        busy = [q for q in e.get("queues", []) if q["pending_bytes"]]
        rows.append(
            Text(
                "queues: "
                + (", ".join(f"{q['ring']}->{q['reader']} {q['pending_bytes']} B" for q in busy) or "all drained")
            )
        )
        moving = sorted((k[1], v) for k, v in flow.items() if k[0] == e["instance"] and v > 0)
        if moving:
            rows.append(Text("rates: " + ", ".join(f"{ring} {v / 1e3:.1f} kB/s" for ring, v in moving)))
        p = e["pools"]
        rows.append(
            Text(
                f"pools per rank: device {p['device_blocks']} blocks ({p['device_bytes_per_rank'] / 2**20:.1f} "
                f"MiB), host {p['host_blocks']} blocks ({p['host_bytes_per_rank'] / 2**20:.1f} MiB); host slots "
                f"in use per rank: {', '.join('cleared' if n is None else str(n) for n in p['host_slots_in_use'])}"
            )
        )
        tr = e.get("transfers", {})
        if "leases" in tr:
            rows.append(Text(f"transfers in: leases {tr['leases']}, links {len(tr['links'])} open"))
        if "progress" in tr:
            rows.append(
                Text(
                    "worker progress: "
                    + ", ".join(f"r{p['rank']} {p['layers_done']} layers ({p['state']})" for p in tr["progress"])
                )
            )
        for pr in e.get("problems", []):
            rows.append(Text(f"PROBLEM {pr['kind']}: {pr['message']}", style="bold red"))
        for line in recent_transitions(e.get("log_dir", ""), 4):
            rows.append(Text(line.replace(" INFO transition ", " "), style="dim", no_wrap=True, overflow="ellipsis"))
        look = {"live": "bold", "starting": "bold cyan"}.get(e["state"], "bold yellow")
        title = Text(f"{e['instance']} [{e['state']}]", style=look)
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
        print(json.dumps(snap, indent=2))
    else:
        from rich.console import Console

        Console().print(render(snap))
    return 1 if name and snap["instances"][0].get("state") == "vanished" else 0


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
