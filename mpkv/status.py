"""What an instance's shared memory says about it, as the records of mpkv.report: the one reader behind
`mpkv ctl status` and mpkv-top (which adds queues, pools, transfers and problems). Reads only; never waits, never
writes. On a cuda instance it also asks NVML (mpkv.gpumem) for its processes' and devices' GPU memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence

import msgspec

from mpkv.config import CacheConfig
from mpkv.gpumem import DeviceMemory, GpuMemory
from mpkv.handshake import Command, Status, acknowledged, link_must_unmap, settled_ledger, step_done
from mpkv.instance import CONTROL_COMMAND, CONTROL_LEDGER, Instance, controller_wait_slot, launcher_slot
from mpkv.protocol import ROLES, ActorState, ClearFlags, Cmd, actor_name, actor_slot, slot_actor
from mpkv.report import NO_WAIT, ActorStatus, CommandStatus, InstanceStatus, StepStatus
from mpkv.shm.proc import ProcId
from mpkv.shm.signals import Signal
from mpkv.topology import pool_owner, unpack_ledger


def ledger(inst: Instance) -> tuple[ClearFlags, int]:
    """What the controller's ledger records: the tiers cleared since the last restore, and the weight version the
    KV in the pools belongs to (the config's before any). ``settled`` counts what the last command did since."""
    sig = inst.control.read_or_dead(CONTROL_LEDGER)
    return unpack_ledger(sig.aux) if sig.seq else (ClearFlags(0), inst.cfg.weight_version)


def decode_pool_gone(inst: Instance, ranks: Iterable[int]) -> str:
    """Why the device pools of ``ranks`` of decode instance ``inst`` are no longer (or soon no longer) served, or
    "": the one rule behind the lease allocator (a batch completes only into pools still served) and a link (what
    it shipped may not have landed). First what the command word and ledger say (clearing or stopping now, or
    cleared), then who holds the pools: the launcher (its actors exit with it), then each rank's pool owner."""
    cmd = inst.control.read_or_dead(CONTROL_COMMAND)
    if link_must_unmap(Command(cmd.value, cmd.epoch, cmd.aux)):
        doing = "clearing its pool" if cmd.value == Cmd.CLEAR else "shutting down"
        return f"decode instance {inst.name!r} is {doing} ({cmd.value.name}@{cmd.epoch})"
    if ClearFlags.DEVICE in ledger(inst)[0]:
        return f"the pool of decode instance {inst.name!r} is cleared (no restore since)"
    if launcher := inst.launcher_gone():
        return f"decode instance {inst.name!r} is gone ({launcher})"
    owner_role = pool_owner(inst.cfg)
    for rank in ranks:
        owner = inst.status.read(actor_slot(owner_role, rank))
        if owner.value == ActorState.FAILED or not owner.writer.alive():
            return (
                f"the pool owner of decode instance {inst.name!r} rank {rank} is {owner.writer.describe()} "
                f"({owner.value.name}@{owner.epoch})"
            )
    return ""


def actor_statuses(inst: Instance, alive: Callable[[ProcId], bool] = ProcId.alive) -> list[Status | None]:
    """Every actor's acknowledged state, rank-major (None: its process died, as ``alive`` tells), as
    ``handshake.step_done`` takes it."""
    out: list[Status | None] = []
    for rank in range(inst.cfg.tp):
        for role in ROLES:
            sig = inst.status.read_or_dead(actor_slot(role, rank))
            live = sig.seq == 0 or alive(sig.writer)
            # An actor that stopped has exited: it acknowledged SHUTDOWN, and that stays true.
            out.append(Status(sig.value, sig.epoch) if live or sig.value == ActorState.STOPPED else None)
    return out


def settled(
    inst: Instance, alive: Callable[[ProcId], bool] = ProcId.alive
) -> tuple[Command, list[Status | None], ClearFlags, int]:
    """The last command, every actor's status, what is cleared and the weight version, with what the last command
    did counted (``handshake.settled_ledger``); ``step_done(cmd, statuses)`` says whether it is acknowledged."""
    sig = inst.control.read_or_dead(CONTROL_COMMAND)
    cmd = Command(sig.value, sig.epoch, sig.aux)
    statuses = actor_statuses(inst, alive)
    return (cmd, statuses, *settled_ledger(cmd, step_done(cmd, statuses), *ledger(inst)))


def pending(cmd: Command, statuses: list[Status | None], tp: int) -> list[str]:
    """The actors (rank-major, as ``actor_statuses``) that have not acknowledged ``cmd``: dead, FAILED or behind."""
    names = [actor_name(role, rank) for rank in range(tp) for role in ROLES]
    return [
        f"{name} ({'dead' if s is None else f'{s.state.name}@{s.epoch}'})"
        for name, s in zip(names, statuses, strict=True)
        if not acknowledged(cmd, s)
    ]


def actor_status(inst: Instance, slot: int, now_ns: int) -> ActorStatus:
    """The process of a status slot: what it acknowledged, its pid and liveness, its error's first line, and what
    it waits for (the launcher publishes no waits: its ``waits`` slot is the controller's)."""
    sig: Signal[ActorState] = inst.status.read_or_dead(slot)
    launcher = slot == launcher_slot(inst.cfg.tp)
    if launcher:
        role, rank = "launcher", -1
    else:
        kind, rank = slot_actor(slot)
        role = kind.name.lower()
    error = ([] if launcher else inst.read_error(slot).strip().splitlines()) or [""]
    return ActorStatus(
        role=role,
        rank=rank,
        pid=sig.writer.pid,
        alive=sig.writer.alive() if sig.writer.pid else False,
        process_state=sig.writer.state(),
        state=sig.value.name,
        epoch=sig.epoch,
        aux=sig.aux,
        heartbeat_age_s=round((now_ns - sig.timestamp_ns) / 1e9, 3) if sig.seq else None,
        error=error[0],
        waiting_for=NO_WAIT if launcher else inst.waiting_for(slot),
    )


def gpu_memory(
    cfg: CacheConfig, procs: Sequence[ActorStatus]
) -> tuple[list[ActorStatus], tuple[DeviceMemory, ...], str]:
    """``procs`` (of an instance of config ``cfg``) with the GPU memory NVML attributes to each live one, the
    devices' free and total memory, and the note on them (``InstanceStatus.gpu_note``). Only a cuda instance asks
    NVML: status is read often, and a cpu instance's processes hold no GPU memory of its own."""
    if cfg.backend != "cuda":
        return list(procs), (), "n/a: cpu backend"
    gm = GpuMemory.open()
    if not gm.available:
        return list(procs), (), f"n/a: {gm.reason}"
    # A dead process's pid may be another's by now, and a pid 0 never published: neither is asked.
    used = gm.process_bytes(a.pid for a in procs if a.pid and a.alive)
    devices = tuple(gm.devices())
    with_gpu = [msgspec.structs.replace(a, gpu_bytes=used[a.pid]) if a.pid in used else a for a in procs]
    return with_gpu, devices, gm.note


def read_status(inst: Instance) -> InstanceStatus:
    """The instance's status record (`mpkv ctl NAME status --json`); reads only."""
    cfg = inst.cfg
    cmd, statuses, tiers, version = settled(inst)
    waiting = pending(cmd, statuses, cfg.tp)
    now = time.monotonic_ns()
    procs = [actor_status(inst, launcher_slot(cfg.tp), now)]
    procs += [actor_status(inst, actor_slot(role, rank), now) for rank in range(cfg.tp) for role in ROLES]
    (launcher, *actors), devices, note = gpu_memory(cfg, procs)
    return InstanceStatus(
        instance=inst.name,
        run_id=inst.registry.run_id,
        config=json.loads(cfg.to_json()),
        command=CommandStatus(cmd.kind.name, cmd.epoch, cmd.aux),
        # A step the controller gave up on (failed, timed out) and the actors have not finished: only a retry of
        # that step, a full clear or a shutdown is admitted (handshake.check_command).
        step=StepStatus(done=not waiting, pending=tuple(waiting)),
        weight_version=version,
        cleared=tuple(f.name for f in ClearFlags if f in tiers and f.name),
        launcher=launcher,
        controller_waiting_for=inst.waiting_for(controller_wait_slot(cfg.tp)),
        actors=tuple(actors),
        gpu_devices=devices,
        gpu_note=note,
    )
