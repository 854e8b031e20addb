"""mpkv-top against real instances: its JSON agrees with `mpkv ctl status`, it names a stuck actor and who waits
for it, its live view runs in a real terminal (tmux) and restores it, and instances that come and go (kill -9
of a launcher included) never crash it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgspec
import numpy as np
import pytest
from instances import Launched

from mpkv.client import Client
from mpkv.controller import Controller
from mpkv.gpumem import DeviceMemory
from mpkv.report import (
    NO_WAIT,
    ActorStatus,
    CommandStatus,
    InstanceStatus,
    StepStatus,
    Wait,
    culprits,
    status_lines,
    unhealthy,
)
from mpkv.shm.cleanup import cleanup
from mpkv.status import decode_pool_gone

TOP = [sys.executable, "-m", "mpkv.top"]
CTL = [sys.executable, "-m", "mpkv.cli", "ctl"]


def top_json(name: str | None = None) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(
        [*TOP, *([name] if name else []), "--once", "--json"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def until(
    what: str, check: Callable[[], object], timeout_s: float = 30, show: Callable[[], str] | None = None
) -> object:
    """Poll ``check`` until it returns something true; the deadline only catches a hang."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"never saw {what} within {timeout_s} s" + (f"; the screen:\n{show()}" if show else ""))


def run_text(cmd: list[str]) -> str:
    # Wide enough that rich wraps or cuts no line of mpkv-top's panel (a pipe is 80 columns otherwise).
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=dict(os.environ, COLUMNS="300"))
    assert out.returncode == 0, out.stderr
    return out.stdout


def actor_lines(text: str) -> list[list[str]]:
    """The per-process lines of a status text (in mpkv-top's panel too): who, pid, state@epoch, alive or DEAD. Not
    the heartbeat's age and the wait: those move on between two reads (an idle actor runs a moment to heartbeat)."""
    out = []
    for line in text.splitlines():
        words = line.strip().strip("│").split()
        if "pid" in words and "heartbeat" in words:
            hb = words.index("heartbeat")
            out.append([*words[:hb], words[hb + 2]])
    return out


def test_json_agrees_with_ctl_status(instance: str) -> None:
    """One reader, one schema, one renderer: ctl status's JSON decodes as the typed record with the values of the
    instance launched, mpkv-top's JSON carries the same entries, and both texts show the same process lines."""
    with Launched(instance, tp=2), Client(instance) as client:
        client.wait(client.swap_out(np.arange(3, dtype=np.int32)))  # three host slots in use on every rank
        snap = top_json(instance)
        raw = run_text([*CTL, instance, "status", "--json"])
        ctl_text, top_text = run_text([*CTL, instance, "status"]), run_text([*TOP, instance, "--once"])
        with Controller(instance) as ctl:  # the one "is the pool still served" rule (the lease allocator's, a link's)
            assert decode_pool_gone(ctl.inst, range(2)) == ""
            ctl.pause()
            ctl.clear(device=True, host=False)
            assert decode_pool_gone(ctl.inst, [1]) == f"decode instance {instance!r} is clearing its pool (CLEAR@2)"
    typed = msgspec.json.decode(raw, type=InstanceStatus)  # every field there, of its type (strict)
    assert (typed.instance, typed.command, typed.step) == (instance, CommandStatus("NONE", 0, 0), StepStatus(True, ()))
    assert (typed.weight_version, typed.cleared, typed.config["tp"]) == (1, (), 2)
    assert [a.who for a in typed.actors] == [f"{r} r{k}" for k in range(2) for r in ("worker", "transfer", "messager")]
    for a in (typed.launcher, *typed.actors):
        assert a.alive and a.state == "READY" and a.epoch == 0 and a.heartbeat_age_s is not None, a
        assert a.process_state.startswith("alive"), a
        assert a.waiting_for.kind == ("NONE" if a.role == "launcher" else "COMMAND"), a
    assert typed.controller_waiting_for == NO_WAIT
    assert len({a.pid for a in (typed.launcher, *typed.actors)}) == 7  # seven processes
    st = json.loads(raw)
    assert snap["schema"] == "mpkv-top/1"
    (e,) = snap["instances"]
    assert e["state"] == "live" and e["problems"] == [], e["problems"]
    for key in ("instance", "run_id", "config", "command", "weight_version", "cleared"):
        assert e[key] == st[key], key
    fields = ("role", "rank", "pid", "alive", "state", "epoch", "error")
    assert [{f: a[f] for f in fields} for a in e["actors"]] == [{f: a[f] for f in fields} for a in st["actors"]]
    assert [a["waiting_for"]["kind"] for a in e["actors"]] == [a["waiting_for"]["kind"] for a in st["actors"]]
    assert {q["ring"] for q in e["queues"]} >= {"tasks.worker", "tasks.transfer", "done.worker.r0"}
    assert e["log_dir"] and os.path.exists(os.path.join(e["log_dir"], "worker.r0.log"))
    assert e["pools"]["host_slots_in_use"] == [3, 3], e["pools"]
    # The renderer both use: the same head and process lines, in the same order, whichever prints them.
    assert f"instance {instance} run {typed.run_id}: mixed tp=2" in ctl_text and ctl_text.splitlines()[0] in top_text
    assert actor_lines(ctl_text) == actor_lines(top_text) and len(actor_lines(ctl_text)) == 7, (ctl_text, top_text)
    assert "worker r1" in ctl_text and "idle" in ctl_text
    # A cpu instance asks NVML nothing: its GPU memory is n/a, said so in the JSON and in both texts.
    assert (typed.gpu_devices, typed.gpu_note) == ((), "n/a: cpu backend")
    assert [a.gpu_bytes for a in (typed.launcher, *typed.actors)] == [None] * 7
    assert (e["gpu_note"], [a["gpu_bytes"] for a in e["actors"]]) == ("n/a: cpu backend", [None] * 6)
    for text in (ctl_text, top_text):
        assert "GPU memory: n/a (cpu backend)" in text, text
        assert sum(" gpu       n/a" in line for line in text.splitlines()) == 7, text


def test_a_stuck_actor_is_named_with_its_waiters(instance: str) -> None:
    """transfer r1 never acknowledges PAUSE (a hang injected there): mpkv-top flags it (no heartbeat) and spells
    out the chain from the controller that waits for it."""
    with Launched(instance, tp=2, fault="transfer:1:PAUSE:hang"):
        ctl = subprocess.Popen(
            [sys.executable, "-m", "mpkv.cli", "ctl", instance, "pause", "--timeout", "60"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            def flagged() -> list:  # type: ignore[type-arg]
                (e,) = top_json(instance)["instances"]
                kinds = {(p["kind"], p["actor"]) for p in e["problems"]}
                return (
                    e["problems"] if {("stale_heartbeat", "transfer r1"), ("long_wait", "controller")} <= kinds else []
                )

            found = until("transfer r1 flagged", flagged)
            text = " | ".join(p["message"] for p in found)  # type: ignore[union-attr]
            assert "controller waits for transfer r1 since" in text, text
            assert "transfer r1 (pid" in text and "hung or stopped?" in text, text
        finally:
            ctl.kill()
            ctl.wait(10)


def tmux(session: str, *args: str, check: bool = False) -> str:
    """A tmux command on the test's own tmux server (-L): sessions of tests running beside it, on the default
    server, would otherwise share its window-size rules (a detached session's size is then not its own)."""
    return subprocess.run(["tmux", "-L", session, *args], capture_output=True, text=True, check=check).stdout


@contextmanager
def tmux_top(session: str, args: str, rows: int = 60) -> Iterator[Callable[[], str]]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    cmd = (
        f"{sys.executable} -m mpkv.top {args}; echo TOP-EXITED-$?; stty -a | tr ' ' '\\n' | grep -x -- '-*icanon';"
        " sleep 60"
    )
    subprocess.run(
        ["tmux", "-L", session, "new-session", "-d", "-s", session, "-x", "150", "-y", str(rows), cmd],
        check=True,
        # pytest-xdist sets COLUMNS=80 and LINES=24 in its workers, and rich sizes its view by them before the
        # terminal's own size: the pane must see the size it has.
        env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | {"TERM": "xterm-256color"},
    )

    def screen() -> str:
        return tmux(session, "capture-pane", "-p", "-t", session)

    try:
        yield screen
    finally:
        tmux(session, "kill-server")


def test_live_view_in_a_real_terminal(instance: str) -> None:
    with Launched(instance, tp=2), tmux_top(f"{instance}tmux", f"{instance} --interval 0.2") as screen:
        first = until("the instance on screen", lambda: screen() if f"{instance} [live]" in screen() else "")
        stamp = first.splitlines()[0]  # type: ignore[union-attr]
        until("the view to refresh", lambda: screen().splitlines()[0] != stamp)
        assert "worker r1" in screen() and "idle" in screen()
        tmux(f"{instance}tmux", "send-keys", "-t", f"{instance}tmux", "q", check=True)
        # the shell prints TOP-EXITED-<code>, then stty's icanon or -icanon: wait for both (a capture in between
        # shows the first alone)
        after = until(
            "mpkv-top to exit on q, and the terminal's mode",
            lambda: screen() if re.search(r"TOP-EXITED-.*\n(-?icanon)\n", screen(), re.S) else "",
        )
        assert "TOP-EXITED-0" in after, after  # type: ignore[operator]
        assert "\nicanon" in "\n" + after, f"the terminal was not restored (still -icanon): {after}"  # type: ignore[operator]
        assert f"{instance} [live]" not in after, "the alternate screen was not left"  # type: ignore[operator]


def test_instances_come_and_go_under_a_live_view(instance: str) -> None:
    """A live view of every instance while one starts, is killed with -9 (launcher) and cleaned up: no crash."""
    # Tall: the view lists every instance of this user, also those of tests running beside this one.
    with tmux_top(f"{instance}tmux", "--interval 0.2", rows=400) as screen:
        until("the view up", lambda: "mpkv-top" in screen())
        inst = Launched(instance, tp=1)
        with inst:
            until("the new instance", lambda: f"{instance} [live]" in screen(), show=screen)
            inst.proc.send_signal(signal.SIGKILL)  # its actors die with it (parent-death signal)
            assert inst.exit_code() == -signal.SIGKILL
            until("the instance shown dead or gone", lambda: f"{instance} [live]" not in screen())
            cleanup(instance=instance)  # the names a killed launcher leaves behind
            until("the instance gone from the view", lambda: instance not in screen())
        assert "TOP-EXITED" not in screen(), screen()
        tmux(f"{instance}tmux", "send-keys", "-t", f"{instance}tmux", "q", check=True)
        assert "TOP-EXITED-0" in until("exit", lambda: screen() if "TOP-EXITED" in screen() else "")  # type: ignore[operator]


def _actor(
    who: str,
    state: str = "READY",
    alive: bool = True,
    hb: float = 0.2,
    kind: str = "COMMAND",
    on: tuple[str, ...] = (),
    since: float = 0.0,
) -> ActorStatus:
    role, rank = who.split(" r")
    return ActorStatus(
        role=role,
        rank=int(rank),
        pid=100 + int(rank),
        alive=alive,
        process_state="alive, sleeping" if alive else "dead",
        state=state,
        epoch=3,
        aux=0,
        heartbeat_age_s=hb,
        error="boom" if state == "FAILED" else "",
        waiting_for=Wait(kind, on, since),
    )


def _status(*actors: ActorStatus, controller: Wait = NO_WAIT) -> InstanceStatus:
    return InstanceStatus(
        instance="x",
        run_id="r",
        config={},
        command=CommandStatus("NONE", 0, 0),
        step=StepStatus(True, ()),
        weight_version=1,
        cleared=(),
        launcher=_actor("launcher r-1"),
        controller_waiting_for=controller,
        actors=actors,
    )


def test_problems_from_the_wait_for_graph() -> None:
    """The pure part: dead, FAILED, stale heartbeat, a long wait with its chain, and a cycle are each named."""
    from mpkv.top import problems

    assert problems(_status(_actor("worker r0"), _actor("transfer r0"))) == ()
    stuck = _status(
        _actor("transfer r1", kind="PEERS", on=("worker r1",), since=12.0),
        _actor("worker r1", alive=False),
        _actor("messager r0", state="FAILED"),
        _actor("worker r0", hb=9.0),
        controller=Wait("ACKS", ("transfer r1",), 12.3),
    )
    got = {(p.kind, p.actor): p.message for p in problems(stuck)}
    assert "dead" in got[("dead", "worker r1")]
    assert "FAILED: boom" in got[("failed", "messager r0")]
    assert "hung or stopped" in got[("stale_heartbeat", "worker r0")]
    assert got[("long_wait", "controller")] == (
        "controller waits for transfer r1 since 12.3 s; transfer r1 (pid 101 (alive, sleeping); READY@3) waits for "
        "worker r1 since 12.0 s; worker r1 (pid 101) is dead, last READY@3"
    )
    cyclic = _status(
        _actor("worker r0", kind="PEERS", on=("transfer r0",), since=7.0),
        _actor("transfer r0", kind="PEERS", on=("worker r0",), since=7.0),
    )
    kinds = {p.kind for p in problems(cyclic)}
    assert kinds == {"cycle"}, problems(cyclic)


def test_culprits_from_the_status_record() -> None:
    """Instance.culprits' words, a pure function of the record: who FAILED or died, then who was stopped after."""
    calm = _status(_actor("worker r0", state="STOPPED"), _actor("transfer r0"))
    assert culprits(calm) == "the instance was stopped (worker r0)"
    broken = _status(
        _actor("worker r0", state="FAILED"),
        _actor("transfer r0", state="PAUSED", alive=False),
        _actor("messager r0", state="STOPPED", alive=False),  # stopped, then exited: not a culprit
    )
    assert culprits(broken) == (
        "worker r0 (pid 100) FAILED: boom; transfer r0 died: pid 100 is dead (last state PAUSED@3) "
        "(then the launcher stopped messager r0)"
    )


def test_unhealthy_is_broken_not_booting() -> None:
    """`ctl status` exits 1 on what report.unhealthy names: FAILED, or dead without having stopped; an actor still
    booting (no pid published yet) or one that stopped and exited is not a reason."""
    booting = msgspec.structs.replace(_actor("worker r0", state="BOOTING", alive=False), pid=0)
    stopped = _actor("transfer r0", state="STOPPED", alive=False)
    assert unhealthy(_status(booting, stopped)) == []
    sick = _status(_actor("worker r0", state="FAILED"), _actor("transfer r0", state="READY", alive=False))
    assert unhealthy(sick) == ["worker r0 (pid 100) is FAILED", "transfer r0 (pid 100) is dead"]


def test_gpu_memory_in_the_status_text() -> None:
    """What `ctl status` and mpkv-top print of the GPU figures a cuda instance's record carries: each process's
    bytes (n/a: withheld, or not alive), the devices' free of total, and the note on them; and why when none."""
    gpu = msgspec.structs.replace(
        _status(
            msgspec.structs.replace(_actor("worker r0"), gpu_bytes=3 << 29),
            msgspec.structs.replace(_actor("transfer r0"), gpu_bytes=512 << 20),
            _actor("messager r0"),
        ),
        gpu_devices=(
            DeviceMemory(0, "NVIDIA H200", 130 << 30, int(139.8 * 2**30)),
            DeviceMemory(1, "NVIDIA H200", 0, 1),
        ),
        gpu_note="NVML lists 3 other process(es) on the GPUs but none of these",
        config={"pd_role": "mixed", "tp": 1, "backend": "cuda", "log_dir": ""},
    )
    text = "\n".join(line.text for line in status_lines(gpu))
    assert "  GPU memory free: #0 130 GiB of 139.8 GiB, #1 0 B of 1 B (NVIDIA H200); NVML lists 3 other" in text, text
    assert " gpu   1.5 GiB " in text and " gpu   512 MiB " in text and " gpu       n/a " in text, text
    unavailable = msgspec.structs.replace(
        gpu, gpu_devices=(), gpu_note="n/a: no NVIDIA driver (libnvidia-ml.so.1 not found)"
    )
    assert "  GPU memory: n/a (no NVIDIA driver (libnvidia-ml.so.1 not found))" in [
        line.text for line in status_lines(unavailable)
    ]
    # A record from before these fields (decoded with their defaults) still reads.
    raw = msgspec.to_builtins(gpu)
    for a in (raw["launcher"], *raw["actors"]):
        del a["gpu_bytes"]
    del raw["gpu_devices"], raw["gpu_note"]
    old = msgspec.convert(raw, InstanceStatus)
    assert old.gpu_devices == () and {a.gpu_bytes for a in old.actors} == {None}
    assert "  GPU memory: n/a (not reported)" in [line.text for line in status_lines(old)]


def test_a_booting_instance_shows_as_starting(instance: str) -> None:
    inst = Launched(instance, tp=1, fault="worker:0:start:hang")  # never READY: the launcher stays BOOTING
    try:

        def attached() -> dict | None:  # type: ignore[type-arg]
            mine = [e for e in top_json()["instances"] if e["instance"] == instance]
            return mine[0] if mine and mine[0]["state"] != "vanished" else None

        entry = until("the booting instance", attached)
        assert isinstance(entry, dict)
        assert entry["launcher"]["state"] == "BOOTING" and entry["launcher"]["alive"], entry["launcher"]
        assert entry["state"] == "starting", entry
    finally:
        inst.__exit__()
    assert inst.proc.returncode == 1 and any("interrupted by SIGTERM during start" in line for line in inst.lines)
