"""kill -9 of each actor kind during clear, restore and a swap; launcher death; a child dying at start.
Each time: the waiting call fails before its deadline naming the actor, the launcher exits non-zero, and no
process or /dev/shm entry remains (the leak fixture checks the last part)."""

from __future__ import annotations

import os
import select
import signal
import threading
import time

import numpy as np
import pytest
from instances import Launched

from mpkv.client import Client
from mpkv.controller import Controller, StepFailed
from mpkv.errors import PeerDied
from mpkv.naming import list_names
from mpkv.protocol import Role, actor_slot, unpack_slots
from mpkv.shm.cleanup import cleanup

DEADLINE_S = 60.0


def _pid_of(ctl: Controller, role: Role, rank: int) -> int:
    return ctl.inst.status.read(actor_slot(role, rank)).writer.pid


def _kill_when_hung(ctl: Controller, victim: int, epoch: int) -> None:
    """Wait until the command of ``epoch`` is out (the victim hangs on it by fault injection), then kill -9."""
    ctl.inst.control.wait(0, lambda s: s.epoch >= epoch, what="the command to go out", timeout_s=DEADLINE_S)
    os.kill(victim, signal.SIGKILL)


@pytest.mark.parametrize("step", ["CLEAR", "RESTORE"])
@pytest.mark.parametrize("role", [Role.WORKER, Role.TRANSFER, Role.MESSAGER])
def test_kill_an_actor_during_a_step(instance: str, role: Role, step: str) -> None:
    rank = 1
    with Launched(instance, tp=2, fault=f"{role.name.lower()}:{rank}:{step}:hang") as inst, Controller(instance) as ctl:
        victim = _pid_of(ctl, role, rank)
        ctl.pause()
        if step == "RESTORE":
            ctl.clear()
        epoch = ctl.inst.control.read(0).epoch + 1
        killer = threading.Thread(target=_kill_when_hung, args=(ctl, victim, epoch))
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(StepFailed, match=rf"{step}@{epoch} failed: {role.name.lower()} r{rank} died.*pid {victim}"):
            ctl.clear() if step == "CLEAR" else ctl.restore(5)
        assert time.monotonic() - t0 < DEADLINE_S
        killer.join()
        assert inst.exit_code() == 1
        assert any(
            f"{role.name.lower()} r{rank} (pid {victim}) died with killed by SIGKILL" in line for line in inst.lines
        )


@pytest.mark.parametrize("role", [Role.WORKER, Role.TRANSFER, Role.MESSAGER])
def test_kill_an_actor_during_a_swap(instance: str, role: Role) -> None:
    # The transfer manager of rank 0 hangs inside the swap (fault injection), so the swap is in flight when the
    # victim dies; whoever it is, the client's wait fails naming it, and the launcher tears the instance down.
    with Launched(instance, tp=2, fault="transfer:0:task:hang") as inst, Client(instance) as client:
        ticket = client.swap_out(np.array([1, 2], dtype=np.int32))
        victim = client.inst.status.read(actor_slot(role, 0)).writer.pid
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(PeerDied, match=rf"swap-out \(task \d+\) lost: {role.name.lower()} r0 died: pid {victim}"):
            client.wait(ticket, timeout_s=DEADLINE_S)
        assert time.monotonic() - t0 < DEADLINE_S
        assert inst.exit_code() == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_instance_and_unlinks_everything(instance: str, signum: signal.Signals) -> None:
    inst = Launched(instance, tp=2)
    inst.wait_line("ready")
    inst.proc.send_signal(signum)
    assert inst.exit_code() == (130 if signum == signal.SIGINT else 0)
    assert any(f"{signum.name} received, shutting down" in line for line in inst.lines)
    inst.__exit__()
    assert not [n for n in list_names() if instance in n], f"names left behind after {signum.name}"


def test_a_child_dying_at_start_is_named(instance: str) -> None:
    inst = Launched(instance, tp=2, fault="worker:1:start:crash")
    line = inst.wait_line("died during start")
    assert "worker r1 (pid" in line and "exit code 3" in line
    assert inst.exit_code() == 1
    inst.__exit__()


def test_kill_the_launcher(instance: str) -> None:
    inst = Launched(instance, tp=2)
    try:
        inst.wait_line("ready")
        with Controller(instance) as ctl:
            pids = [ctl.inst.status.read(i).writer for i in range(6)]
        inst.proc.kill()
        inst.exit_code()
        # The actors die with it (PR_SET_PDEATHSIG); then cleanup reclaims every name (here, before the harness's
        # own exit would: it reclaims the names of a launcher killed by a signal).
        deadline = time.monotonic() + DEADLINE_S
        for p in pids:
            if p.alive():
                fd = os.pidfd_open(p.pid)  # readable once the process has exited
                try:
                    select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                finally:
                    os.close(fd)
        assert not any(p.alive() for p in pids), "actors survived their launcher"
        report = cleanup(instance=instance)
        assert report.removed and not report.live_instances
    finally:
        inst.__exit__()


@pytest.mark.parametrize("waiter", ["controller", "client"])
def test_a_killed_launcher_is_named_first(instance: str, waiter: str) -> None:
    """kill -9 of the launcher while a step (or a task) waits on its actors: they die with it (parent-death signal),
    and the failing call says the launcher died, not merely that every actor is a zombie."""
    fault = "transfer:1:CLEAR:hang" if waiter == "controller" else "transfer:0:task:hang"
    inst = Launched(instance, tp=2, fault=fault)
    with inst, Controller(instance) as ctl, Client(instance) as client:
        launcher = inst.proc.pid
        if waiter == "controller":
            ctl.pause()
            epoch = ctl.inst.control.read(0).epoch + 1
            killer = threading.Thread(target=_kill_when_hung, args=(ctl, launcher, epoch))
            killer.start()
            with pytest.raises(StepFailed, match=rf"CLEAR@{epoch} failed: launcher pid {launcher} died .*exited with"):
                ctl.clear(timeout_s=DEADLINE_S)
            killer.join()
        else:
            ticket = client.swap_out(np.array([1], dtype=np.int32))
            os.kill(launcher, signal.SIGKILL)
            with pytest.raises(PeerDied, match=rf"lost: launcher pid {launcher} died .*exited with it"):
                client.wait(ticket, timeout_s=DEADLINE_S)
    cleanup(instance=instance)


def test_waits_are_published_for_the_wait_for_graph(instance: str) -> None:
    """A stuck attacher during CLEAR: its owner publishes that it waits for it, the controller that it waits for
    the owner's acknowledgement; the step fails at its deadline naming the one that did not acknowledge."""
    with Launched(instance, tp=1, fault="messager:0:CLEAR:hang") as inst, Controller(instance) as ctl:
        # Ready means every actor acknowledged; each then publishes its wait for the next command, a moment later.
        deadline = time.monotonic() + DEADLINE_S
        while {a.waiting_for.kind for a in ctl.status().actors} != {"COMMAND"}:
            assert time.monotonic() < deadline, [(a.role, a.waiting_for) for a in ctl.status().actors]
            time.sleep(0.01)
        ctl.pause()
        seen: dict[str, object] = {}
        epoch = ctl.inst.control.read(0).epoch + 1  # the CLEAR's

        def observe() -> None:
            from mpkv.instance import Instance, controller_wait_slot

            view = Instance.attach(instance)
            try:
                worker = actor_slot(Role.WORKER, 0)
                view.control.wait(0, lambda s: s.epoch >= epoch, what="the CLEAR command", timeout_s=DEADLINE_S)
                view.waits.wait(
                    # the transfer manager detaches at once; the hung messager never does
                    worker,
                    lambda s: unpack_slots(s.aux) == [actor_slot(Role.MESSAGER, 0)],
                    what="the owner's wait",
                    timeout_s=DEADLINE_S,
                )
                seen["owner"] = view.waiting_for(worker)
                seen["controller"] = view.waiting_for(controller_wait_slot(1))
            finally:
                view.close()

        watcher = threading.Thread(target=observe)
        watcher.start()
        with pytest.raises(
            StepFailed,
            match=r"CLEAR@2 failed: worker r0 did not acknowledge within 3 s: worker r0 \(pid \d+ \(alive.*PAUSED@1\) "
            r"waits for messager r0 since [\d.]+ s; messager r0 \(pid \d+ \(alive.*PAUSED@1\) "
            r"is not waiting for a peer",
        ):
            ctl.clear(timeout_s=3)
        watcher.join()
        owner, controller = seen["owner"], seen["controller"]  # report.Wait records
        assert (owner.kind, owner.on) == ("PEERS", ("messager r0",)), seen  # type: ignore[attr-defined]
        # The controller names the actors not done yet, the owner first (the transfer manager may or may not have
        # acknowledged when the record was read; the hung messager has not).
        assert controller.kind == "ACKS" and controller.on[0] == "worker r0", seen  # type: ignore[attr-defined]
        assert "messager r0" in controller.on, seen  # type: ignore[attr-defined]
        os.kill(ctl.inst.status.read(actor_slot(Role.MESSAGER, 0)).writer.pid, signal.SIGKILL)
        assert inst.exit_code() == 1
